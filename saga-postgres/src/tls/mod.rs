//! What a connection's configuration needs to be secured: libpq's
//! `sslmode` and `sslrootcert`, read from the connection string, turned into
//! the rustls connector that every connection of this crate uses (the
//! store's pool, the outbox dispatcher's `LISTEN` connection, query
//! cancellation).
//!
//! The driver (`tokio-postgres`) knows `sslmode=disable|prefer|require`
//! only: it decides *whether* to encrypt. Whether and how the server's
//! certificate is checked is the connector's business, so this module reads
//! `verify-ca`, `verify-full` and `sslrootcert` itself, with libpq's meaning
//! (see [`ConnectConfig`]).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use percent_encoding::percent_decode_str;
use rustls::ClientConfig;
use tokio_postgres_rustls::MakeRustlsConnect;

mod verify;

use verify::{client_config, unchecked_connector};

/// libpq's `sslmode`: whether a connection is encrypted, and how much of
/// the server's certificate is checked (see [`ConnectConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum SslMode {
    /// Never encrypt.
    Disable,
    /// Encrypt if the server offers it; check no certificate (unless
    /// `sslrootcert` names a file: then the chain is checked).
    #[default]
    Prefer,
    /// Always encrypt; check no certificate (unless `sslrootcert` names a
    /// file: then the chain is checked).
    Require,
    /// Always encrypt; the certificate must chain to a trusted root.
    VerifyCa,
    /// Always encrypt; the certificate must chain to a trusted root and
    /// name the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The spelling in connection strings, e.g. `verify-full`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What the driver is told: whether to encrypt.
    fn driver(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Driver;
        match self {
            SslMode::Disable => Driver::Disable,
            SslMode::Prefer => Driver::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Driver::Require,
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, TlsError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` (plain first, TLS if refused) has no
            // equivalent in the driver.
            other => return Err(TlsError::UnknownSslMode(other.to_owned())),
        })
    }
}

/// Where the trusted root certificates come from (libpq's `sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RootCerts {
    /// The platform's trust store (`sslrootcert=system`).
    System,
    /// A PEM file of one or more certificates (`sslrootcert=PATH`), e.g.
    /// the CA bundle a managed service publishes.
    File(PathBuf),
}

/// Why a connection configuration could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// `sslmode` is not one of `disable`, `prefer`, `require`, `verify-ca`,
    /// `verify-full`.
    #[error("unknown sslmode {0:?}: expected disable, prefer, require, verify-ca or verify-full")]
    UnknownSslMode(String),

    /// `sslrootcert=system` with a mode weaker than `verify-full` (refused,
    /// as libpq refuses it: trusting every public CA without checking the
    /// host name checks nothing).
    #[error("sslrootcert=system needs sslmode=verify-full, not sslmode={0}")]
    SystemRootsNeedVerifyFull(SslMode),

    /// The rest of the connection string does not parse.
    #[error("invalid connection string")]
    InvalidUrl(#[source] tokio_postgres::Error),

    /// The `sslrootcert` file could not be read.
    #[error("could not read the root certificate file {}", path.display())]
    ReadRootCert {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// The `sslrootcert` file is not PEM.
    #[error("the root certificate file {} is not valid PEM", path.display())]
    ParseRootCert {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },

    /// A certificate of the `sslrootcert` file cannot be a trust anchor.
    #[error("a certificate in {} cannot be used as a root", path.display())]
    InvalidRootCert {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },

    /// The `sslrootcert` file holds no certificate.
    #[error("the root certificate file {} holds no certificate", path.display())]
    NoRootCert {
        /// The file.
        path: PathBuf,
    },

    /// The platform's trust store yielded no usable certificate.
    #[error("the platform's trust store has no usable root certificate")]
    NoSystemRoots {
        /// The first error met while reading it, if any.
        #[source]
        source: Option<rustls_native_certs::Error>,
    },

    /// rustls refused the configuration.
    #[error("could not build the TLS configuration")]
    Rustls(#[source] rustls::Error),

    /// The certificate verifier could not be built.
    #[error("could not build the certificate verifier")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
}

/// How to connect to PostgreSQL: the driver's configuration, and the TLS
/// connector that its `sslmode` (and `sslrootcert`) call for.
///
/// libpq's modes:
///
/// | `sslmode` | encrypted | certificate checked |
/// |---|---|---|
/// | `disable` | never | — |
/// | `prefer` (the default) | if the server offers it | no (the chain only if `sslrootcert` names a file) |
/// | `require` | always | no (the chain only if `sslrootcert` names a file) |
/// | `verify-ca` | always | chain to a trusted root |
/// | `verify-full` | always | chain, and the host name (or IP address) in `host` |
///
/// Trusted roots are the file named by `sslrootcert=PATH` (PEM, one or
/// more certificates) or, with `sslrootcert=system` or no `sslrootcert` at
/// all, the platform's trust store (read by `rustls-native-certs`;
/// `SSL_CERT_FILE` and `SSL_CERT_DIR` override it). Unlike libpq,
/// `~/.postgresql/root.crt` is not read. As in libpq, `sslrootcert=system`
/// asks for `verify-full` (the default then) and refuses weaker modes.
/// Roots are read when the configuration is made, so an unreadable file
/// fails at start-up with a [`TlsError`], not at the first connection.
///
/// Made from a connection string with [`from_url`](Self::from_url) (or
/// `parse`), from a driver configuration with [`new`](Self::new) or
/// `From<tokio_postgres::Config>` (its own `sslmode`: disable, prefer or
/// require, no certificate checked), or with a rustls configuration of your
/// own with [`with_client_config`](Self::with_client_config) (client
/// certificates, pinned keys, another crypto provider). Cheap to clone.
///
/// ```
/// use saga_postgres::{ConnectConfig, SslMode};
///
/// let c: ConnectConfig = "postgres://app@db.example.com/app?sslmode=require".parse()?;
/// assert_eq!(c.ssl_mode(), SslMode::Require);
/// # Ok::<(), saga_postgres::TlsError>(())
/// ```
#[derive(Clone)]
pub struct ConnectConfig {
    config: tokio_postgres::Config,
    mode: SslMode,
    connector: MakeRustlsConnect,
}

impl fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The driver's `Debug` redacts the password.
        f.debug_struct("ConnectConfig")
            .field("config", &self.config)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl ConnectConfig {
    /// Reads a libpq connection string (`postgres://…?sslmode=verify-full&sslrootcert=/path/ca.pem`
    /// or `host=… sslmode=verify-full sslrootcert=/path/ca.pem`), and the
    /// trusted roots it names.
    pub fn from_url(url: &str) -> Result<Self, TlsError> {
        let split = split_tls_params(url);
        let config = tokio_postgres::Config::from_str(&split.rest).map_err(TlsError::InvalidUrl)?;
        let mode = split.sslmode.as_deref().map(str::parse).transpose()?;
        let roots = split.sslrootcert.as_deref().map(|v| match v {
            "system" => RootCerts::System,
            path => RootCerts::File(PathBuf::from(path)),
        });
        Self::build(config, mode, roots)
    }

    /// `config` secured as `mode` says, trusting `root_cert` (`None`: as
    /// libpq without `sslrootcert`; see [`ConnectConfig`]).
    /// `config`'s own `ssl_mode` is replaced.
    pub fn new(
        config: tokio_postgres::Config,
        mode: SslMode,
        root_cert: Option<RootCerts>,
    ) -> Result<Self, TlsError> {
        Self::build(config, Some(mode), root_cert)
    }

    /// `config` secured with your own rustls configuration: `mode` decides
    /// only whether to encrypt (`disable`: never; `prefer`: if offered;
    /// otherwise always); checking the server's certificate is up to
    /// `client`'s verifier. (For the PostgreSQL 17 direct TLS negotiation,
    /// set its ALPN protocols to `postgresql`.)
    #[must_use]
    pub fn with_client_config(
        mut config: tokio_postgres::Config,
        mode: SslMode,
        client: ClientConfig,
    ) -> Self {
        config.ssl_mode(mode.driver());
        ConnectConfig {
            config,
            mode,
            connector: MakeRustlsConnect::new(client),
        }
    }

    fn build(
        mut config: tokio_postgres::Config,
        mode: Option<SslMode>,
        roots: Option<RootCerts>,
    ) -> Result<Self, TlsError> {
        let (mode, check) = decide(mode, roots)?;
        config.ssl_mode(mode.driver());
        let connector = match check {
            Check::Nothing => unchecked_connector().clone(),
            check => MakeRustlsConnect::new(client_config(check)?),
        };
        Ok(ConnectConfig {
            config,
            mode,
            connector,
        })
    }

    /// The driver's configuration (its `ssl_mode` says whether to encrypt).
    #[must_use]
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The driver's configuration, to adjust what TLS does not depend on
    /// (the application name, timeouts).
    pub(crate) fn config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }

    /// The mode in effect.
    #[must_use]
    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// The connector for this configuration, e.g. to connect a client of
    /// your own: `c.config().connect(c.connector())`.
    #[must_use]
    pub fn connector(&self) -> MakeRustlsConnect {
        self.connector.clone()
    }
}

impl FromStr for ConnectConfig {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, TlsError> {
        ConnectConfig::from_url(s)
    }
}

impl From<tokio_postgres::Config> for ConnectConfig {
    /// The driver's own `ssl_mode` (disable, prefer or require), no
    /// certificate checked: what libpq does with the same settings.
    fn from(config: tokio_postgres::Config) -> Self {
        use tokio_postgres::config::SslMode as Driver;
        let mode = match config.get_ssl_mode() {
            Driver::Disable => SslMode::Disable,
            Driver::Prefer => SslMode::Prefer,
            // `Require`, and any mode a later driver adds: encrypt.
            _ => SslMode::Require,
        };
        ConnectConfig {
            config,
            mode,
            connector: unchecked_connector().clone(),
        }
    }
}

/// The connector for query cancellation, whatever the connection's
/// configuration: it encrypts when the connection's `sslmode` asks for it
/// (the driver decides from the mode the connection was made with) and
/// checks no certificate. A cancel request carries only the key that
/// cancels one running statement of that connection.
pub(crate) fn cancel_connector() -> MakeRustlsConnect {
    unchecked_connector().clone()
}

/// What is checked of the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain(RootCerts),
    ChainAndHost(RootCerts),
}

/// The mode in effect and what it checks, from libpq's `sslmode` (`None`:
/// not given) and `sslrootcert` (`None`: not given).
fn decide(mode: Option<SslMode>, roots: Option<RootCerts>) -> Result<(SslMode, Check), TlsError> {
    Ok(match (mode, roots) {
        (None | Some(SslMode::VerifyFull), Some(RootCerts::System)) => {
            (SslMode::VerifyFull, Check::ChainAndHost(RootCerts::System))
        }
        (Some(mode), Some(RootCerts::System)) => {
            return Err(TlsError::SystemRootsNeedVerifyFull(mode));
        }
        (Some(SslMode::Disable), _) => (SslMode::Disable, Check::Nothing),
        (mode @ (None | Some(SslMode::Prefer | SslMode::Require)), roots) => {
            let mode = mode.unwrap_or_default();
            match roots {
                // libpq: a root file given makes `prefer` and `require`
                // check the chain.
                Some(file) => (mode, Check::Chain(file)),
                None => (mode, Check::Nothing),
            }
        }
        (Some(SslMode::VerifyCa), roots) => (
            SslMode::VerifyCa,
            Check::Chain(roots.unwrap_or(RootCerts::System)),
        ),
        (Some(SslMode::VerifyFull), roots) => (
            SslMode::VerifyFull,
            Check::ChainAndHost(roots.unwrap_or(RootCerts::System)),
        ),
    })
}

/// A connection string with `sslmode` and `sslrootcert` taken out (the
/// driver refuses `verify-*` and does not know `sslrootcert`).
#[derive(Debug, PartialEq, Eq)]
struct Split {
    rest: String,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of a URL or key-value connection
/// string (the last of each wins, as in the driver). A string this cannot
/// read is returned whole, for the driver to report what is wrong with it.
fn split_tls_params(s: &str) -> Split {
    let whole = || Split {
        rest: s.to_owned(),
        sslmode: None,
        sslrootcert: None,
    };
    let parsed = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        split_url(s)
    } else {
        split_key_value(s)
    };
    parsed.unwrap_or_else(whole)
}

fn split_url(s: &str) -> Option<Split> {
    let Some((base, query)) = s.split_once('?') else {
        return Some(Split {
            rest: s.to_owned(),
            sslmode: None,
            sslrootcert: None,
        });
    };
    let mut out = Split {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
    };
    let mut kept = Vec::new();
    for part in query.split('&') {
        let Some((key, value)) = part.split_once('=') else {
            kept.push(part);
            continue;
        };
        let key = percent_decode_str(key).decode_utf8().ok()?;
        let slot = match &*key {
            "sslmode" => &mut out.sslmode,
            "sslrootcert" => &mut out.sslrootcert,
            _ => {
                kept.push(part);
                continue;
            }
        };
        *slot = Some(percent_decode_str(value).decode_utf8().ok()?.into_owned());
    }
    out.rest = base.to_owned();
    if !kept.is_empty() {
        out.rest.push('?');
        out.rest.push_str(&kept.join("&"));
    }
    out.sslrootcert = out.sslrootcert.filter(|v| !v.is_empty());
    Some(out)
}

/// libpq's key-value form: `key = value` pairs separated by white space; a
/// value is either `'quoted'` or runs to the next white space, with `\`
/// escaping the next character in both.
fn split_key_value(s: &str) -> Option<Split> {
    let mut out = Split {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
    };
    let mut kept = Vec::new();
    let mut chars = s.char_indices().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        skip_ws(&mut chars);
        chars.next_if(|(_, c)| *c == '=')?;
        skip_ws(&mut chars);
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next()?.1 {
                    '\'' => break,
                    '\\' => value.push(chars.next()?.1),
                    c => value.push(c),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?.1);
                } else {
                    value.push(c);
                }
            }
        }
        let end = chars.peek().map_or(s.len(), |&(i, _)| i);
        match key.as_str() {
            "sslmode" => out.sslmode = Some(value),
            "sslrootcert" => out.sslrootcert = Some(value),
            _ => kept.push(&s[start..end]),
        }
    }
    out.rest = kept.join(" ");
    out.sslrootcert = out.sslrootcert.filter(|v| !v.is_empty());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str) -> RootCerts {
        RootCerts::File(PathBuf::from(p))
    }

    #[test]
    fn each_mode_and_root_choice_decides_what_is_checked() {
        use Check::*;
        use SslMode::*;
        let sys = || RootCerts::System;
        let rows: Vec<(Option<SslMode>, Option<RootCerts>, SslMode, Check)> = vec![
            (None, None, Prefer, Nothing),
            (None, Some(file("ca.pem")), Prefer, Chain(file("ca.pem"))),
            (None, Some(sys()), VerifyFull, ChainAndHost(sys())),
            (Some(Disable), None, Disable, Nothing),
            (Some(Disable), Some(file("ca.pem")), Disable, Nothing),
            (Some(Prefer), None, Prefer, Nothing),
            (
                Some(Prefer),
                Some(file("ca.pem")),
                Prefer,
                Chain(file("ca.pem")),
            ),
            (Some(Require), None, Require, Nothing),
            (
                Some(Require),
                Some(file("ca.pem")),
                Require,
                Chain(file("ca.pem")),
            ),
            (Some(VerifyCa), None, VerifyCa, Chain(sys())),
            (
                Some(VerifyCa),
                Some(file("ca.pem")),
                VerifyCa,
                Chain(file("ca.pem")),
            ),
            (Some(VerifyFull), None, VerifyFull, ChainAndHost(sys())),
            (
                Some(VerifyFull),
                Some(file("ca.pem")),
                VerifyFull,
                ChainAndHost(file("ca.pem")),
            ),
            (
                Some(VerifyFull),
                Some(sys()),
                VerifyFull,
                ChainAndHost(sys()),
            ),
        ];
        for (mode, roots, want_mode, want_check) in rows {
            let got = decide(mode, roots.clone()).unwrap();
            assert_eq!(got, (want_mode, want_check), "{mode:?} {roots:?}");
        }
    }

    #[test]
    fn system_roots_refuse_every_mode_below_verify_full() {
        for mode in [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
        ] {
            let err = decide(Some(mode), Some(RootCerts::System)).unwrap_err();
            assert!(
                matches!(err, TlsError::SystemRootsNeedVerifyFull(m) if m == mode),
                "{mode}: {err}"
            );
        }
    }

    #[test]
    fn the_driver_is_told_only_whether_to_encrypt() {
        use tokio_postgres::config::SslMode as Driver;
        for (mode, driver) in [
            (SslMode::Disable, Driver::Disable),
            (SslMode::Prefer, Driver::Prefer),
            (SslMode::Require, Driver::Require),
            (SslMode::VerifyCa, Driver::Require),
            (SslMode::VerifyFull, Driver::Require),
        ] {
            assert_eq!(mode.driver(), driver, "{mode}");
            assert_eq!(mode.as_str().parse::<SslMode>().unwrap(), mode);
        }
    }

    #[test]
    fn an_unknown_sslmode_is_a_typed_error() {
        for bad in ["allow", "verify_full", "VERIFY-FULL", ""] {
            let err = bad.parse::<SslMode>().unwrap_err();
            assert!(
                matches!(&err, TlsError::UnknownSslMode(v) if v == bad),
                "{err}"
            );
        }
        let err = ConnectConfig::from_url("postgres://db/app?sslmode=verify").unwrap_err();
        assert!(matches!(&err, TlsError::UnknownSslMode(v) if v == "verify"));
        assert!(err.to_string().contains("verify-full"), "{err}");
    }

    #[test]
    fn tls_parameters_are_taken_out_of_urls() {
        let rows = [
            ("postgres://u@h/db", "postgres://u@h/db", None, None),
            (
                "postgresql://u@h:5433/db?sslmode=verify-full&sslrootcert=/etc/ca.pem",
                "postgresql://u@h:5433/db",
                Some("verify-full"),
                Some("/etc/ca.pem"),
            ),
            (
                "postgres://u@h/db?application_name=w&sslmode=require&connect_timeout=3",
                "postgres://u@h/db?application_name=w&connect_timeout=3",
                Some("require"),
                None,
            ),
            (
                "postgres://u@h/db?sslrootcert=%2Ftmp%2Fmy%20ca.pem&ssl%6Dode=verify-ca",
                "postgres://u@h/db",
                Some("verify-ca"),
                Some("/tmp/my ca.pem"),
            ),
            // The last one wins; an empty root is none.
            (
                "postgres://h/db?sslmode=disable&sslmode=verify-full&sslrootcert=",
                "postgres://h/db",
                Some("verify-full"),
                None,
            ),
        ];
        for (url, rest, mode, root) in rows {
            let got = split_tls_params(url);
            assert_eq!(
                got,
                Split {
                    rest: rest.to_owned(),
                    sslmode: mode.map(str::to_owned),
                    sslrootcert: root.map(str::to_owned),
                },
                "{url}"
            );
        }
    }

    #[test]
    fn tls_parameters_are_taken_out_of_key_value_strings() {
        let rows = [
            (
                "host=h dbname=db sslmode=verify-full sslrootcert=/etc/ca.pem",
                "host=h dbname=db",
                Some("verify-full"),
                Some("/etc/ca.pem"),
            ),
            (
                "  sslmode = 'verify-ca'   password='it\\'s' user=u sslrootcert='/a b/c\\'d.pem'",
                "password='it\\'s' user=u",
                Some("verify-ca"),
                Some("/a b/c'd.pem"),
            ),
            ("host=h password=a\\ b", "host=h password=a\\ b", None, None),
        ];
        for (s, rest, mode, root) in rows {
            let got = split_tls_params(s);
            assert_eq!(
                got,
                Split {
                    rest: rest.to_owned(),
                    sslmode: mode.map(str::to_owned),
                    sslrootcert: root.map(str::to_owned),
                },
                "{s}"
            );
        }
        // What it cannot read goes to the driver whole, which says why.
        assert_eq!(split_tls_params("host='h").rest, "host='h");
        let err = ConnectConfig::from_url("host='h sslmode=verify-full").unwrap_err();
        assert!(matches!(err, TlsError::InvalidUrl(_)), "{err}");
    }

    #[test]
    fn the_driver_gets_the_rest_and_the_mode() {
        use tokio_postgres::config::SslMode as Driver;
        let c = ConnectConfig::from_url(
            "postgres://app@db.example.com:6432/shop?sslmode=verify-full&sslrootcert=system&application_name=w",
        )
        .unwrap();
        assert_eq!(c.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(c.config().get_ssl_mode(), Driver::Require);
        assert_eq!(c.config().get_ports(), [6432]);
        assert_eq!(c.config().get_dbname(), Some("shop"));
        assert_eq!(c.config().get_application_name(), Some("w"));

        let c = ConnectConfig::from_url("host=h sslmode=disable").unwrap();
        assert_eq!(c.config().get_ssl_mode(), Driver::Disable);
        let c = ConnectConfig::from_url("host=h").unwrap();
        assert_eq!(
            (c.ssl_mode(), c.config().get_ssl_mode()),
            (SslMode::Prefer, Driver::Prefer)
        );

        let mut driver = tokio_postgres::Config::new();
        driver.host("h").ssl_mode(Driver::Require);
        assert_eq!(ConnectConfig::from(driver).ssl_mode(), SslMode::Require);
    }
}
