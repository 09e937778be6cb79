//! Who may call what. Under mutual TLS every caller presents a certificate
//! from the pair's CA; this module tells from it who the caller is and
//! refuses what that identity may not do.
//!
//! Identities (all certificates signed by the pair's CA, `tls.ca`):
//!
//! | identity | its certificate | may call |
//! |---|---|---|
//! | operator | a subjectAltName URI `urn:understudy:operator:NAME` | Control: everything; the console |
//! | console client | a subjectAltName URI `urn:understudy:console:NAME` | the guest console (`tls.console = true`) |
//! | the peer host | a subjectAltName naming the other host (an IP address of its `[primary]`/`[backup]` table, or `tls.primary_name`/`tls.backup_name`), and no operator URI | Replication; Control.Status and Epochs |
//! | anyone else | — | nothing |
//!
//! An operator certificate can never act as a host, whatever else it names.
//! In insecure mode (plaintext, loopback unless overridden) there are no
//! identities and everything is allowed: that mode is for demos and tests.
//! Refusals are logged with who asked and counted
//! (`understudy_refused_requests_total`).

use std::net::IpAddr;
use std::sync::Arc;

use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The subjectAltName URI prefix of operator certificates.
pub const OPERATOR_URI_PREFIX: &str = "urn:understudy:operator:";
/// The subjectAltName URI prefix of console clients' certificates (they may
/// use the guest console and nothing else).
pub const CONSOLE_URI_PREFIX: &str = "urn:understudy:console:";

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Plaintext: nobody is identified (insecure mode).
    Anonymous,
    /// The other host of the pair.
    PeerHost,
    /// An operator, by the name in its certificate.
    Operator(String),
    /// A console client (the guest console only), by its name.
    Console(String),
    /// A certificate that names neither (what it names, for the log).
    Unknown(String),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("an anonymous caller (plaintext)"),
            Self::PeerHost => f.write_str("the peer host"),
            Self::Operator(name) => write!(f, "operator {name:?}"),
            Self::Console(name) => write!(f, "console client {name:?}"),
            Self::Unknown(what) => write!(f, "an unknown certificate ({what})"),
        }
    }
}

/// What an RPC needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Replication: only the other host.
    PeerHost,
    /// Read-only figures: operators and the other host.
    OperatorOrHost,
    /// Anything that changes the VM's fate: operators only.
    Operator,
}

/// Counts a refusal, by RPC (the daemon's metrics).
#[derive(Clone)]
pub struct OnRefusal(pub Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for OnRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnRefusal")
    }
}

/// Identifies callers and enforces [`Access`].
#[derive(Clone, Debug)]
pub struct Authority {
    /// False in insecure mode: everyone is allowed.
    secure: bool,
    /// Names (IP addresses, DNS names) the peer host's certificate may carry.
    peer_names: Vec<String>,
    on_refusal: Option<OnRefusal>,
}

impl Authority {
    /// Mutual TLS: the peer host is whoever's certificate names one of
    /// `peer_names`; each refusal is reported to `on_refusal`.
    pub fn mutual_tls(peer_names: Vec<String>, on_refusal: Option<OnRefusal>) -> Self {
        Self {
            secure: true,
            peer_names,
            on_refusal,
        }
    }

    /// Insecure mode: no identities, everything allowed.
    pub fn insecure() -> Self {
        Self {
            secure: false,
            peer_names: Vec::new(),
            on_refusal: None,
        }
    }

    /// Who sent `request`.
    pub fn identify<T>(&self, request: &Request<T>) -> Caller {
        if !self.secure {
            return Caller::Anonymous;
        }
        let Some(certs) = request.peer_certs() else {
            return Caller::Unknown("no client certificate".into());
        };
        let Some(leaf) = certs.first() else {
            return Caller::Unknown("no client certificate".into());
        };
        self.identify_der(leaf.as_ref())
    }

    /// Who holds the certificate `der` (already verified against the CA by
    /// the TLS layer).
    pub fn identify_der(&self, der: &[u8]) -> Caller {
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return Caller::Unknown("unreadable certificate".into());
        };
        let mut names = Vec::new();
        let mut operator = None;
        let mut console = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) => {
                        if let Some(op) = uri.strip_prefix(OPERATOR_URI_PREFIX) {
                            operator = Some(op.to_owned());
                        }
                        if let Some(c) = uri.strip_prefix(CONSOLE_URI_PREFIX) {
                            console = Some(c.to_owned());
                        }
                        names.push(uri.to_string());
                    }
                    GeneralName::DNSName(dns) => names.push(dns.to_ascii_lowercase()),
                    GeneralName::IPAddress(bytes) => {
                        let ip = match bytes.len() {
                            4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                            _ => None,
                        };
                        if let Some(ip) = ip {
                            names.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        if let Some(name) = operator {
            return Caller::Operator(name);
        }
        if let Some(name) = console {
            return Caller::Console(name);
        }
        if names.iter().any(|n| self.peer_names.iter().any(|p| p == n)) {
            return Caller::PeerHost;
        }
        let subject = cert.subject().to_string();
        Caller::Unknown(if names.is_empty() {
            subject
        } else {
            format!("{subject}; names {}", names.join(", "))
        })
    }

    /// Allows `request` to call `rpc` if its caller has `access`; otherwise
    /// logs and counts the refusal and answers PERMISSION_DENIED.
    pub fn check<T>(
        &self,
        request: &Request<T>,
        rpc: &'static str,
        access: Access,
    ) -> Result<Caller, Status> {
        let caller = self.identify(request);
        let allowed = matches!(
            (&caller, access),
            (Caller::Anonymous, _)
                | (Caller::PeerHost, Access::PeerHost | Access::OperatorOrHost)
                | (
                    Caller::Operator(_),
                    Access::Operator | Access::OperatorOrHost
                )
        );
        if allowed {
            return Ok(caller);
        }
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "?".into());
        tracing::warn!(rpc, caller = %caller, %peer, "request refused: not authorized");
        if let Some(OnRefusal(count)) = &self.on_refusal {
            count(rpc);
        }
        let who_may = match access {
            Access::PeerHost => "only the pair's other host",
            Access::OperatorOrHost => "operators and the pair's hosts",
            Access::Operator => {
                "only operators (certificates with a urn:understudy:operator: name)"
            }
        };
        Err(Status::permission_denied(format!(
            "{rpc} refused: {caller} may not call it ({who_may} may)"
        )))
    }
}
