//! Test certificates, generated at start time with `rcgen`.
//!
//! Each TLS-enabled server gets its own fresh CA, so no certificate or key is ever committed
//! and a test can't accidentally trust another server's CA. Certificates name `localhost` and
//! `127.0.0.1`, so clients can verify the host name either way.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::error::{Error, Result};
use crate::util::{set_mode, write_file};

/// Paths of the PEM files of a TLS-enabled test server (all in the server's temp folder).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate that signed the server and client certificates: trust this.
    pub ca_cert: PathBuf,
    /// The server's certificate (SANs `localhost` and `127.0.0.1`).
    pub server_cert: PathBuf,
    /// The server's private key (PKCS#8, ECDSA P-256).
    pub server_key: PathBuf,
    /// A client certificate signed by the same CA (for mutual TLS, which the servers do not
    /// require).
    pub client_cert: PathBuf,
    /// The client certificate's private key.
    pub client_key: PathBuf,
    /// The CA certificate in PEM, for clients that take bytes rather than a path.
    pub ca_pem: String,
}

fn cert_err(e: rcgen::Error) -> Error {
    Error::Certificate(e.to_string())
}

/// Generates a CA plus server and client certificates and writes them to `dir`.
pub(crate) fn generate(dir: &Path) -> Result<TlsFiles> {
    let ca_key = KeyPair::generate().map_err(cert_err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "distlock test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).map_err(cert_err)?;

    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let server_key = KeyPair::generate().map_err(cert_err)?;
    let mut server_params = CertificateParams::new(names.clone()).map_err(cert_err)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Etcd and Consul peers also use the server certificate as a client.
    server_params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let server = server_params
        .signed_by(&server_key, &ca, &ca_key)
        .map_err(cert_err)?;

    let client_key = KeyPair::generate().map_err(cert_err)?;
    let mut client_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, "distlock-test-client");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params
        .signed_by(&client_key, &ca, &ca_key)
        .map_err(cert_err)?;

    let files = TlsFiles {
        ca_cert: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
        ca_pem: ca.pem(),
    };
    write_file(&files.ca_cert, &files.ca_pem)?;
    write_file(&files.server_cert, server.pem())?;
    write_file(&files.server_key, server_key.serialize_pem())?;
    write_file(&files.client_cert, client.pem())?;
    write_file(&files.client_key, client_key.serialize_pem())?;
    // PostgreSQL refuses a key file readable by others.
    set_mode(&files.server_key, 0o600)?;
    set_mode(&files.client_key, 0o600)?;
    Ok(files)
}
