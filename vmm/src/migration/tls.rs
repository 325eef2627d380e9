//! TLS for migration connections: rustls (TLS 1.3 only, the `ring`
//! provider), both ends authenticated by pinned certificates, by a
//! pre-shared key proved inside TLS, or both; key generation for
//! `vmm keygen`; and [`TlsStream`], a TLS connection whose read half and
//! write half two threads use at once, as the migration does with its
//! sockets.
//!
//! - **Pinned certificates.** Each side has its own key and self-signed
//!   certificate (`vmm keygen --out DIR`) and the peer's certificate
//!   (`--tls-peer`). A connection is accepted only if the peer presents
//!   exactly that certificate (DER compared byte for byte) and proves it
//!   holds its key (the TLS 1.3 handshake signature, checked with the
//!   provider's algorithms). No CA, no names, no validity dates: to revoke,
//!   replace the pinned file.
//! - **Pre-shared key** (`vmm keygen --psk FILE`, the same file on both
//!   sides). rustls has no external-PSK mode, so the handshake runs with
//!   certificates (this process's own throwaway one if none is given), and
//!   right after it each side sends an HMAC-SHA256, keyed with the file's
//!   contents, over its role and the TLS session's exporter value. A man in
//!   the middle has two TLS sessions with different exporter values: it can
//!   neither forward nor forge the proofs.
//!
//! After the handshake, both sides exchange an [`AUTH_LEN`]-byte block
//! (`VMMAUTH1`, a flag, the proof or zeros), so that a side with a key and
//! one without are told apart with a clear error.

use super::transport::{Conn, Deadline};
use super::{lock, MigrationError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The name in every certificate `vmm keygen` makes, and the one the source
/// asks for (names are not checked: the certificate is pinned).
pub const SERVER_NAME: &str = "vmm-migration";
/// Largest PEM or key file read.
const MAX_FILE: u64 = 1 << 20;
/// Shortest pre-shared key accepted, in bytes of the file.
pub const MIN_PSK: usize = 32;
/// The block both ends send after the TLS handshake.
const AUTH_MAGIC: [u8; 8] = *b"VMMAUTH1";
/// Its length: magic, flag (1: a pre-shared key proof follows), proof.
pub const AUTH_LEN: usize = 8 + 1 + 32;
/// The exporter label the proofs are computed over.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-vmm-migration-psk";
/// Largest plaintext handed to rustls at once (the records go out at once).
const WRITE_CHUNK: usize = 64 << 10;

/// Where one side's TLS material is. Paths as given to `vmm receive`, or
/// (absolute) in a control request.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsFiles {
    /// This side's certificate (PEM).
    pub cert: Option<PathBuf>,
    /// This side's private key (PEM, mode 0600).
    pub key: Option<PathBuf>,
    /// The peer's certificate, pinned (PEM).
    pub peer: Option<PathBuf>,
    /// A pre-shared key file, the same on both sides (mode 0600).
    pub psk: Option<PathBuf>,
}

impl TlsFiles {
    /// Nothing given: no TLS.
    pub fn is_empty(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.peer.is_none() && self.psk.is_none()
    }

    /// Every path given, for a request that another process carries out.
    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.cert, &self.key, &self.peer, &self.psk]
            .into_iter()
            .flatten()
    }

    /// Refuses relative paths (the VMM that reads them runs elsewhere).
    pub fn check_absolute(&self) -> Result<(), TlsError> {
        match self.paths().find(|p| !p.is_absolute()) {
            Some(p) => Err(TlsError::NotAbsolute(p.clone())),
            None => Ok(()),
        }
    }
}

/// Errors of setting up TLS or generating keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Some of the certificate options are missing.
    #[error("TLS with certificates needs --tls-cert, --tls-key and --tls-peer together ({0} is missing); or give --tls-psk FILE alone")]
    Incomplete(&'static str),
    /// A file cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file holds nothing usable.
    #[error("{what} {path} holds no PEM {kind}; create one with `vmm keygen --out DIR`")]
    NoPem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What was looked for.
        kind: &'static str,
    },
    /// A secret that other users may read.
    #[error("{what} {path} can be read by other users (mode {mode:03o}): run `chmod 600 {path}`")]
    Exposed {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A pre-shared key too short to be a key.
    #[error("the pre-shared key in {path} has {len} bytes, fewer than {MIN_PSK}: create one with `vmm keygen --psk FILE`")]
    ShortPsk {
        /// Its path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// rustls refused the configuration (a key that does not fit the certificate, ...).
    #[error("the TLS certificate or key cannot be used: {0}; make them with `vmm keygen --out DIR`")]
    Config(#[source] rustls::Error),
    /// Key or certificate generation failed.
    #[error("cannot generate a key pair and certificate: {0}")]
    Generate(#[source] rcgen::Error),
    /// The system's random source failed.
    #[error("the system's random number generator failed")]
    Random,
    /// A path in a request to another process is relative.
    #[error(
        "{0} is a relative path: give an absolute one (the VMM that reads it may run in another directory)"
    )]
    NotAbsolute(PathBuf),
    /// `vmm keygen` would replace a file.
    #[error("{0} exists: remove it first, give --force, or choose another place")]
    Exists(PathBuf),
    /// Writing a file failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A pinned certificate.
#[derive(Debug)]
struct Pinned {
    der: Vec<u8>,
    path: PathBuf,
}

/// The peer's certificate is not the pinned one (the message this side reads).
#[derive(Debug, thiserror::Error)]
#[error("it presented certificate {presented}, not the one pinned in {} ({pinned}): give this side the peer's own cert.pem as --tls-peer", path.display())]
struct NotPinned {
    presented: String,
    pinned: String,
    path: PathBuf,
}

/// Checks the peer's certificate on both ends (one type for both traits).
#[derive(Debug)]
struct PeerVerifier {
    /// `None`: any certificate (the pre-shared key authenticates).
    pinned: Option<Pinned>,
    algs: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        match &self.pinned {
            None => Ok(()),
            Some(p) if end_entity.as_ref() == p.der.as_slice() => Ok(()),
            Some(p) => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(NotPinned {
                    presented: fingerprint(end_entity.as_ref()),
                    pinned: fingerprint(&p.der),
                    path: p.path.clone(),
                })),
            ))),
        }
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// One side's TLS settings, loaded: configurations for both roles (a
/// destination accepts, a source connects) and the pre-shared key.
pub struct Tls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    psk: Option<ring::hmac::Key>,
    pinned: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("pinned", &self.pinned)
            .field("psk", &self.psk.is_some())
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the files and builds the configurations.
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        Tls::load_with(files, |path, what, secret| {
            if secret {
                read_secret(path, what)
            } else {
                read_file(path, what)
            }
        })
    }

    /// [`Tls::load`] with the files' contents from `read(path, what,
    /// secret)` (`secret`: a key, whose mode `load` checks first), checked
    /// and used exactly as `load` does. `fuzz/`'s `migration_auth` target
    /// gives it any contents.
    pub fn load_with(
        files: &TlsFiles,
        mut read: impl FnMut(&Path, &'static str, bool) -> Result<Vec<u8>, TlsError>,
    ) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (chain, key, pinned) = match (&files.cert, &files.key, &files.peer) {
            (Some(c), Some(k), Some(p)) => (
                parse_certs(&read(c, "--tls-cert", false)?, c, "--tls-cert")?,
                parse_key(&read(k, "--tls-key", true)?, k)?,
                Some(parse_pinned(&read(p, "--tls-peer", false)?, p)?),
            ),
            (None, None, None) => {
                let (chain, key) = throwaway_identity()?;
                (chain, key, None)
            }
            (None, _, _) => return Err(TlsError::Incomplete("--tls-cert")),
            (_, None, _) => return Err(TlsError::Incomplete("--tls-key")),
            (_, _, None) => return Err(TlsError::Incomplete("--tls-peer")),
        };
        if pinned.is_none() && files.psk.is_none() {
            return Err(TlsError::Incomplete("--tls-cert"));
        }
        let psk = match files.psk.as_deref() {
            Some(p) => Some(parse_psk(&read(p, "--tls-psk", true)?, p)?),
            None => None,
        };
        let is_pinned = pinned.is_some();
        let verifier = Arc::new(PeerVerifier {
            pinned,
            algs: provider.signature_verification_algorithms,
        });
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(TlsError::Config)?;
        client.resumption = rustls::client::Resumption::disabled();
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(TlsError::Config)?;
        // Every connection is a full handshake: nothing to resume.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
            psk,
            pinned: is_pinned,
        })
    }

    /// How this side authenticates its peer, for messages.
    pub fn describe(&self) -> &'static str {
        match (self.pinned, self.psk.is_some()) {
            (true, true) => "TLS, pinned certificate and pre-shared key",
            (true, false) => "TLS, pinned certificate",
            _ => "TLS, pre-shared key",
        }
    }

    /// The block this side sends after the handshake.
    fn auth_block(&self, conn: &rustls::Connection, role: u8) -> Result<[u8; AUTH_LEN], rustls::Error> {
        match &self.psk {
            Some(_) => Ok(self.auth_block_over(&message(conn, role)?)),
            None => Ok(self.auth_block_over(&[])),
        }
    }

    /// Checks the peer's block (`role`: the peer's role byte).
    fn check_block(&self, conn: &rustls::Connection, block: &[u8; AUTH_LEN], role: u8) -> Result<(), String> {
        self.check_auth(block, || message(conn, role).map_err(|e| e.to_string()))
    }

    /// Checks the peer's authentication block, read from the connection
    /// right after the TLS handshake: the magic, the flag, and with a
    /// pre-shared key the proof over `message()` (the peer's role and the
    /// session's exporter value). `fuzz/`'s `migration_auth` target gives
    /// it any block.
    pub fn check_auth(
        &self,
        block: &[u8; AUTH_LEN],
        message: impl FnOnce() -> Result<Vec<u8>, String>,
    ) -> Result<(), String> {
        if block[..8] != AUTH_MAGIC {
            return Err(
                "it sent no authentication block after the TLS handshake: run the same vmm on both ends"
                    .into(),
            );
        }
        match (&self.psk, block[8]) {
            // Found by fuzzing (migration_auth): any non-zero flag used to
            // count as "proves a key", so one proof had 255 encodings.
            (_, flag @ 2..) => Err(format!(
                "it sent an authentication block of an unknown kind ({flag}): run the same vmm on both ends"
            )),
            (None, 0) => Ok(()),
            (None, _) => Err(
                "it proves a pre-shared key and this side has none: give both ends the same --tls-psk FILE"
                    .into(),
            ),
            (Some(_), 0) => Err(
                "it has no pre-shared key and this side has one: give both ends the same --tls-psk FILE"
                    .into(),
            ),
            (Some(k), _) => {
                let m = message()?;
                // Constant time.
                ring::hmac::verify(k, &m, &block[9..]).map_err(|_| {
                    "it does not know this side's pre-shared key (its --tls-psk file differs): give both ends the same file"
                        .to_string()
                })
            }
        }
    }

    /// The block a side with this configuration sends over `message` (see
    /// [`Tls::check_auth`]): what a genuine peer sends.
    pub fn auth_block_over(&self, message: &[u8]) -> [u8; AUTH_LEN] {
        let mut b = [0u8; AUTH_LEN];
        b[..8].copy_from_slice(&AUTH_MAGIC);
        if let Some(k) = &self.psk {
            b[8] = 1;
            b[9..].copy_from_slice(ring::hmac::sign(k, message).as_ref());
        }
        b
    }
}

/// The message a side's proof signs: a label, its role (`c` or `s`) and the
/// session's exporter value.
fn message(conn: &rustls::Connection, role: u8) -> Result<Vec<u8>, rustls::Error> {
    let exporter = conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)?;
    let mut m = b"vmm migration psk v1 ".to_vec();
    m.push(role);
    m.extend_from_slice(&exporter);
    Ok(m)
}

/// `sha256:` and the hex SHA-256 of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    vmm_core::files::read_regular(path, MAX_FILE).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Reads a secret file: a regular file (checked first: the advice to
/// `chmod` a device or FIFO would be wrong) that group and others can
/// neither read nor write, checked on the file opened.
fn read_secret(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let rerr = |source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    };
    let f = vmm_core::files::open_regular(path).map_err(rerr)?;
    let mode = f.metadata().map_err(rerr)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::Exposed {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    let mut buf = Vec::new();
    f.take(MAX_FILE + 1).read_to_end(&mut buf).map_err(rerr)?;
    if buf.len() as u64 > MAX_FILE {
        return Err(rerr(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is more than the {MAX_FILE} bytes accepted"),
        )));
    }
    Ok(buf)
}

/// The certificates of a PEM file's contents (those that decode; at least one).
fn parse_certs(
    pem: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            what,
            path: path.to_owned(),
            kind: "certificate",
        });
    }
    Ok(certs)
}

/// The pinned peer certificate: the first of the file's.
fn parse_pinned(pem: &[u8], path: &Path) -> Result<Pinned, TlsError> {
    let mut certs = parse_certs(pem, path, "--tls-peer")?;
    Ok(Pinned {
        der: certs.swap_remove(0).as_ref().to_vec(),
        path: path.to_owned(),
    })
}

/// The private key of a PEM file's contents.
fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| TlsError::NoPem {
        what: "--tls-key",
        path: path.to_owned(),
        kind: "private key",
    })
}

/// The pre-shared key of a key file's contents (surrounding whitespace
/// dropped; at least [`MIN_PSK`] bytes).
fn parse_psk(raw: &[u8], path: &Path) -> Result<ring::hmac::Key, TlsError> {
    let key = raw.trim_ascii();
    if key.len() < MIN_PSK {
        return Err(TlsError::ShortPsk {
            path: path.to_owned(),
            len: key.len(),
        });
    }
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key))
}

/// A key pair and self-signed certificate, PEM.
fn generate() -> Result<(rcgen::Certificate, rcgen::KeyPair), TlsError> {
    let key = rcgen::KeyPair::generate().map_err(TlsError::Generate)?;
    let mut params =
        rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(TlsError::Generate)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "vmm migration peer");
    let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
    Ok((cert, key))
}

/// A certificate for this process alone (pre-shared key without certificates).
fn throwaway_identity() -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let (cert, key) = generate()?;
    Ok((
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    ))
}

/// What `vmm keygen --out DIR` wrote.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    /// The certificate (give it to the peer as its `--tls-peer`).
    pub cert: PathBuf,
    /// The private key (mode 0600; stays here).
    pub key: PathBuf,
    /// The certificate's SHA-256 fingerprint (to compare out of band).
    pub fingerprint: String,
}

/// Writes `contents` to a new file `path` with `mode` (replacing it only if `force`).
fn write_new(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<(), TlsError> {
    let werr = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    if std::fs::symlink_metadata(path).is_ok() {
        if !force {
            return Err(TlsError::Exists(path.to_owned()));
        }
        // Removed, not truncated: the new file gets `mode` from its creation.
        std::fs::remove_file(path).map_err(werr)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(werr)?;
    f.write_all(contents).and_then(|()| f.sync_all()).map_err(werr)
}

/// `vmm keygen --out DIR`: a new key pair and self-signed certificate,
/// `DIR/key.pem` (mode 0600) and `DIR/cert.pem`.
pub fn keygen(dir: &Path, force: bool) -> Result<KeyFiles, TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let (cert, key) = generate()?;
    let files = KeyFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        fingerprint: fingerprint(cert.der()),
    };
    write_new(&files.key, key.serialize_pem().as_bytes(), 0o600, force)?;
    write_new(&files.cert, cert.pem().as_bytes(), 0o644, force)?;
    Ok(files)
}

/// `vmm keygen --psk FILE`: 32 random bytes, hex, mode 0600.
pub fn keygen_psk(path: &Path, force: bool) -> Result<(), TlsError> {
    let mut raw = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| TlsError::Random)?;
    let mut hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    hex.push('\n');
    write_new(path, hex.as_bytes(), 0o600, force)
}

/// A TLS connection over a Unix or TCP socket, used by two threads at once
/// (one reads, one writes), as the migration uses its sockets.
///
/// rustls keeps one state for both directions, and its connection cannot
/// be cloned. The halves share it behind a mutex held only while rustls
/// works on memory: a reader blocks in `read(2)` on the socket without it,
/// so a writer is never held up by a reader waiting for data. A second
/// mutex orders the records written: records are taken out of the state and
/// written to the socket under it, in the order rustls made them (their
/// sequence numbers). A third keeps one reader at a time with the bytes read
/// from the socket and not yet handed to rustls. Lock order: `inbuf`, `out`,
/// `state`. No extra thread, copy through a socket pair or hop on the
/// request-answer path.
pub struct TlsStream {
    sock: Conn,
    state: Mutex<rustls::Connection>,
    out: Mutex<Vec<u8>>,
    inbuf: Mutex<InBuf>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.sock)
            .finish_non_exhaustive()
    }
}

/// Bytes read from the socket, not yet handed to rustls.
struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// A rustls error as an IO error (its type is kept: see [`tls_error`]).
fn tls_io(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The rustls error inside an IO error, if it is one.
pub(super) fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

impl TlsStream {
    fn new(sock: Conn, state: rustls::Connection) -> TlsStream {
        TlsStream {
            sock,
            state: Mutex::new(state),
            out: Mutex::new(Vec::new()),
            inbuf: Mutex::new(InBuf {
                buf: vec![0u8; 64 << 10],
                start: 0,
                end: 0,
            }),
        }
    }

    /// The socket below.
    pub(super) fn socket(&self) -> &Conn {
        &self.sock
    }

    /// Writes out the records rustls has made.
    fn flush_records(&self) -> io::Result<()> {
        let mut out = lock(&self.out);
        out.clear();
        {
            let mut s = lock(&self.state);
            while s.wants_write() {
                s.write_tls(&mut *out)?;
            }
        }
        self.sock.write_all_raw(&out)
    }

    /// Reads plaintext (the read half).
    pub(super) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut inb = lock(&self.inbuf);
        loop {
            let (flush, need_more) = {
                let mut s = lock(&self.state);
                match s.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if inb.start == inb.end {
                    (s.wants_write(), true)
                } else {
                    let InBuf { buf: b, start, end } = &mut *inb;
                    let mut rd = &b[*start..*end];
                    let n = s.read_tls(&mut rd)?;
                    *start += n;
                    match s.process_new_packets() {
                        Ok(_) => (s.wants_write(), false),
                        Err(e) => {
                            // The alert rustls queued tells the peer why.
                            drop(s);
                            let _ = self.flush_records();
                            return Err(tls_io(e));
                        }
                    }
                }
            };
            if flush {
                self.flush_records()?;
            }
            if need_more {
                // Blocks without the state lock: the write half goes on.
                inb.start = 0;
                let len = inb.buf.len();
                let n = self.sock.read_raw(&mut inb.buf[..len])?;
                inb.end = n;
                if n == 0 {
                    // The socket ended: rustls tells a clean close (`Ok(0)`
                    // next) from a cut (`UnexpectedEof`).
                    let mut s = lock(&self.state);
                    s.read_tls(&mut io::empty())?;
                    let _ = s.process_new_packets();
                }
            }
        }
    }

    /// Writes plaintext (the write half): encrypted and on the socket when it returns.
    pub(super) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut out = lock(&self.out);
        for chunk in buf.chunks(WRITE_CHUNK) {
            out.clear();
            {
                let mut s = lock(&self.state);
                s.writer().write_all(chunk)?;
                while s.wants_write() {
                    s.write_tls(&mut *out)?;
                }
            }
            self.sock.write_all_raw(&out)?;
        }
        Ok(buf.len())
    }
}

/// Runs a TLS handshake on `sock` until `deadline`.
fn handshake(sock: &Conn, state: &mut rustls::Connection, deadline: Instant) -> io::Result<()> {
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::from(io::ErrorKind::TimedOut))
    };
    while state.is_handshaking() || state.wants_write() {
        if state.wants_write() {
            sock.set_write_timeout_io(Some(remaining()?))?;
            state.write_tls(&mut RawWriter(sock))?;
            continue;
        }
        sock.set_read_timeout_io(Some(remaining()?))?;
        if state.read_tls(&mut RawReader(sock))? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection during the TLS handshake",
            ));
        }
        if let Err(e) = state.process_new_packets() {
            // Tell the peer why (its side then says so too).
            while state.wants_write() && state.write_tls(&mut RawWriter(sock)).is_ok() {}
            sock.close_gently();
            return Err(tls_io(e));
        }
    }
    Ok(())
}

struct RawReader<'a>(&'a Conn);
impl Read for RawReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_raw(buf)
    }
}

struct RawWriter<'a>(&'a Conn);
impl Write for RawWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_raw(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads exactly `buf` from `conn` by `deadline`.
pub(super) fn read_exact_by(conn: &mut Conn, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::from(io::ErrorKind::TimedOut))?;
        conn.set_read_timeout_io(Some(left))?;
        match conn.read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Role bytes in the proofs.
const CLIENT: u8 = b'c';
const SERVER: u8 = b's';

/// The source's side: TLS handshake on `sock`, then the authentication
/// blocks; `peer` names the destination in errors.
pub(super) fn connect(sock: Conn, tls: &Tls, peer: &str, deadline: Deadline) -> Result<Conn, MigrationError> {
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| MigrationError::Protocol(e.to_string()))?;
    let state =
        rustls::ClientConnection::new(tls.client.clone(), name).map_err(|source| MigrationError::Tls {
            peer: peer.into(),
            source,
        })?;
    let mut state = rustls::Connection::Client(state);
    handshake(&sock, &mut state, deadline.at).map_err(|e| handshake_error(e, peer, deadline.of))?;
    let ours = tls
        .auth_block(&state, CLIENT)
        .map_err(|source| MigrationError::Tls {
            peer: peer.into(),
            source,
        })?;
    state.set_buffer_limit(None);
    let stream = Arc::new(TlsStream::new(sock, state));
    let mut conn = Conn::Tls(stream.clone());
    conn.write_all(&ours)
        .map_err(|e| handshake_error(e, peer, deadline.of))?;
    let mut theirs = [0u8; AUTH_LEN];
    read_exact_by(&mut conn, &mut theirs, deadline.at).map_err(|e| handshake_error(e, peer, deadline.of))?;
    let checked = tls.check_block(&lock(&stream.state), &theirs, SERVER);
    if let Err(why) = checked {
        conn.close_gently();
        return Err(MigrationError::Auth {
            peer: peer.into(),
            why,
        });
    }
    Ok(conn)
}

/// The destination's side: TLS handshake on an accepted `sock`, then the
/// authentication blocks (the source's checked before this side's goes).
pub(super) fn accept(sock: Conn, tls: &Tls, peer: &str, deadline: Deadline) -> Result<Conn, MigrationError> {
    let state = rustls::ServerConnection::new(tls.server.clone()).map_err(|source| MigrationError::Tls {
        peer: peer.into(),
        source,
    })?;
    let mut state = rustls::Connection::Server(state);
    handshake(&sock, &mut state, deadline.at).map_err(|e| handshake_error(e, peer, deadline.of))?;
    state.set_buffer_limit(None);
    let stream = Arc::new(TlsStream::new(sock, state));
    let mut conn = Conn::Tls(stream.clone());
    let mut theirs = [0u8; AUTH_LEN];
    read_exact_by(&mut conn, &mut theirs, deadline.at).map_err(|e| handshake_error(e, peer, deadline.of))?;
    let checked = tls.check_block(&lock(&stream.state), &theirs, CLIENT);
    if let Err(why) = checked {
        conn.close_gently();
        return Err(MigrationError::Auth {
            peer: peer.into(),
            why,
        });
    }
    let ours = tls
        .auth_block(&lock(&stream.state), SERVER)
        .map_err(|source| MigrationError::Tls {
            peer: peer.into(),
            source,
        })?;
    conn.write_all(&ours)
        .map_err(|e| handshake_error(e, peer, deadline.of))?;
    Ok(conn)
}

/// What went wrong in a handshake, as the user should read it.
pub(super) fn handshake_error(e: io::Error, peer: &str, within: std::time::Duration) -> MigrationError {
    if let Some(t) = tls_error(&e) {
        return MigrationError::Tls {
            peer: peer.into(),
            source: t.clone(),
        };
    }
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => MigrationError::HandshakeTimeout {
            peer: peer.into(),
            secs: within.as_secs_f64(),
        },
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
            MigrationError::Closed { peer: peer.into() }
        }
        _ => MigrationError::Io {
            what: "the migration handshake",
            source: e,
        },
    }
}

/// Explains a TLS failure (the text after "TLS with PEER failed: ").
pub(super) fn explain(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(CertificateError::Other(o)) => o.0.to_string(),
        E::InvalidCertificate(c) => format!("its certificate is not usable ({c:?})"),
        E::NoCertificatesPresented => {
            "it presented no certificate: start it with --tls-cert and --tls-key (or both ends with --tls-psk)".into()
        }
        E::AlertReceived(
            a @ (AlertDescription::BadCertificate
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRequired),
        ) => format!(
            "it refused this side's certificate (TLS alert {a:?}): its --tls-peer must be this side's cert.pem"
        ),
        E::AlertReceived(a) => format!("it ended the TLS handshake with alert {a:?}: run the same vmm on both ends"),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => format!(
            "it does not speak TLS as this vmm does ({e}): start both ends with TLS options (or neither, on a Unix socket)"
        ),
        E::PeerIncompatible(_) => format!("its TLS is not compatible ({e}): run the same vmm on both ends"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
