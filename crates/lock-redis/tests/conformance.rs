//! The shared conformance suite against real Redis servers started by the
//! harness: once against a single server, once in Redlock mode over three
//! independent masters. Each case gets its own server(s) (a redis-server
//! starts in about 10 ms), so fault cases cannot disturb other cases.

mod common;

mod single {
    use super::common::Servers;

    async fn factory() -> Servers {
        Servers::start(1)
    }

    conformance::suite!(factory);
}

mod redlock {
    use super::common::Servers;

    async fn factory() -> Servers {
        Servers::start(3)
    }

    conformance::suite!(factory);
}
