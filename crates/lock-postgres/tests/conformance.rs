//! The shared conformance suite against a real PostgreSQL 15 started by the
//! harness, once per mode.

mod common;

mod lease {
    async fn factory() -> super::common::PgFactory {
        super::common::PgFactory::new(lock_postgres::Mode::Lease)
    }
    conformance::suite!(factory);
}

mod advisory {
    async fn factory() -> super::common::PgFactory {
        super::common::PgFactory::new(lock_postgres::Mode::Advisory)
    }
    conformance::suite!(factory);
}
