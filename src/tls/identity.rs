//! The verified client certificate, as the app sees it.

use rustls::ServerConnection;
use x509_parser::extensions::GeneralName;

/// The header that carries the verified client identity to the app. Envoy's
/// name and format (`Hash=…;Subject="…";URI=…;DNS=…`), so apps and libraries
/// that already read it work unchanged. The proxy removes any copy the
/// client sent before adding its own: only lameduck may assert it.
pub const CLIENT_CERT_HEADER: &str = "x-forwarded-client-cert";

/// Facts of a client certificate that rustls has verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// SHA-256 of the DER certificate, lowercase hex.
    pub sha256: String,
    /// RFC 4514 subject, e.g. `CN=client`.
    pub subject: String,
    pub uris: Vec<String>,
    pub dns: Vec<String>,
}

impl PeerIdentity {
    /// The end-entity certificate of a finished handshake, if the client
    /// presented one. Only ever called after verification succeeded: with a
    /// client CA configured, rustls fails the handshake on anything else.
    pub fn of(conn: &ServerConnection) -> Option<PeerIdentity> {
        let der = conn.peer_certificates()?.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let mut uris = Vec::new();
        let mut dns = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) => uris.push((*uri).to_string()),
                    GeneralName::DNSName(name) => dns.push((*name).to_string()),
                    _ => {}
                }
            }
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
        Some(PeerIdentity {
            sha256: hex(digest.as_ref()),
            subject: cert.subject().to_string(),
            uris,
            dns,
        })
    }

    /// The [`CLIENT_CERT_HEADER`] value.
    pub fn header_value(&self) -> String {
        let mut out = format!("Hash={}", self.sha256);
        // XFCC quotes values that may hold `,;=`; a subject always can.
        out.push_str(";Subject=\"");
        out.push_str(&self.subject.replace('\\', "\\\\").replace('"', "\\\""));
        out.push('"');
        for uri in &self.uris {
            out.push_str(";URI=");
            out.push_str(uri);
        }
        for name in &self.dns {
            out.push_str(";DNS=");
            out.push_str(name);
        }
        out
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}
