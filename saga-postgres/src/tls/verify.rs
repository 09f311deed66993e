//! The rustls side of [`ConnectConfig`](super::ConnectConfig): the client
//! configuration built for what a mode checks of the server's certificate
//! ([`Check`]), its root certificates, and the certificate verifiers for
//! the modes that do not check the server's name (`prefer`, `require`,
//! `verify-ca`; `verify-full` uses rustls's own `WebPkiServerVerifier`).

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{Check, RootCerts, TlsError};

/// The crypto provider: `ring`, the lighter build (no C++/CMake toolchain,
/// as `aws-lc-rs` would need), already used by the NATS publisher. Named
/// explicitly, so that a process where both providers are compiled in does
/// not make rustls refuse to pick a default.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The connector that encrypts and checks no certificate (`prefer`,
/// `require`; unused by `disable`), built once.
pub(super) fn unchecked_connector() -> &'static MakeRustlsConnect {
    static CONNECTOR: OnceLock<MakeRustlsConnect> = OnceLock::new();
    CONNECTOR.get_or_init(|| {
        let algorithms = provider().signature_verification_algorithms;
        // Infallible: ring's default provider supports rustls's default
        // protocol versions.
        let config = finish(Arc::new(AnyName {
            roots: None,
            algorithms,
        }))
        .expect("ring supports the default TLS versions");
        MakeRustlsConnect::new(config)
    })
}

/// The client configuration that checks what `check` says.
pub(super) fn client_config(check: Check) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = match check {
        Check::Nothing => Arc::new(AnyName {
            roots: None,
            algorithms,
        }),
        Check::Chain(roots) => Arc::new(AnyName {
            roots: Some(Arc::new(load_roots(&roots)?)),
            algorithms,
        }),
        Check::ChainAndHost(roots) => {
            WebPkiServerVerifier::builder_with_provider(Arc::new(load_roots(&roots)?), provider)
                .build()
                .map_err(TlsError::Verifier)?
        }
    };
    finish(verifier)
}

fn finish(verifier: Arc<dyn ServerCertVerifier>) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // What PostgreSQL 17's direct TLS negotiation requires; ignored by
    // servers that negotiate the classic way.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

fn load_roots(roots: &RootCerts) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match roots {
        RootCerts::File(path) => {
            let pem = std::fs::read(path).map_err(|source| TlsError::ReadRootCert {
                path: path.clone(),
                source,
            })?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|source| TlsError::ParseRootCert {
                    path: path.clone(),
                    source,
                })?;
                store
                    .add(cert)
                    .map_err(|source| TlsError::InvalidRootCert {
                        path: path.clone(),
                        source,
                    })?;
            }
            if store.is_empty() {
                return Err(TlsError::NoRootCert { path: path.clone() });
            }
        }
        RootCerts::System => {
            let mut found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                let source = (!found.errors.is_empty()).then(|| found.errors.swap_remove(0));
                return Err(TlsError::NoSystemRoots { source });
            }
        }
    }
    Ok(store)
}

/// Checks everything of the server's certificate but the name it bears:
/// that it chains to a trusted root when there are roots (`verify-ca`), or
/// nothing of the certificate itself when there are none (`prefer`,
/// `require`: encryption without authentication, as in libpq). Either way
/// it still checks that the server holds the key of the certificate it
/// sent.
#[derive(Debug)]
struct AnyName {
    /// `None`: any certificate is accepted.
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::super::{ConnectConfig, RootCerts, SslMode, TlsError};

    #[test]
    fn an_unreadable_or_empty_root_file_is_a_typed_error() {
        let missing = "/nonexistent/saga-postgres/ca.pem";
        let err = ConnectConfig::from_url(&format!(
            "postgres://h/db?sslmode=verify-full&sslrootcert={missing}"
        ))
        .unwrap_err();
        assert!(
            matches!(&err, TlsError::ReadRootCert { path, source }
                if path.to_str() == Some(missing) && source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        assert!(err.to_string().contains(missing), "{err}");

        let dir = std::env::temp_dir().join(format!("saga-tls-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = ConnectConfig::new(
            tokio_postgres::Config::new(),
            SslMode::VerifyCa,
            Some(RootCerts::File(empty.clone())),
        )
        .unwrap_err();
        assert!(
            matches!(&err, TlsError::NoRootCert { path } if *path == empty),
            "{err:?}"
        );

        let broken = dir.join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        let err = ConnectConfig::new(
            tokio_postgres::Config::new(),
            SslMode::VerifyFull,
            Some(RootCerts::File(broken)),
        )
        .unwrap_err();
        assert!(matches!(err, TlsError::ParseRootCert { .. }), "{err:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
