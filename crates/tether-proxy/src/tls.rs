//! TLS listeners: each one serves the certificate of its `tls: { cert, key }` files through a
//! resolver whose key is swapped on config reload, so a renewed certificate needs no restart and
//! connections already open keep theirs.

use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};
use std::net::SocketAddr;
use std::sync::Arc;
use tether_config::{Config, ListenerTls};

/// A TLS listener's certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
#[error("listeners[{index}].tls: {reason}")]
pub struct TlsError {
    /// Index of the listener in `listeners`.
    pub index: usize,
    /// What was wrong, naming the file.
    pub reason: String,
}

/// The certificate a TLS listener presents now.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The certificate stores of every TLS listener, by listener address.
#[derive(Debug, Default)]
pub struct TlsListeners {
    /// Listener address, its index in `listeners`, its certificate.
    stores: Vec<(SocketAddr, usize, Arc<CertStore>)>,
}

/// The process-wide rustls provider (ring), installed on first use as Pingora does.
fn provider() -> Option<Arc<CryptoProvider>> {
    pingora::tls::install_default_crypto_provider();
    CryptoProvider::get_default().cloned()
}

/// Reads a certificate chain and its private key from PEM files and checks they belong together.
pub fn load_key(tls: &ListenerTls, index: usize) -> Result<Arc<CertifiedKey>, TlsError> {
    let fail = |reason: String| TlsError { index, reason };
    let (cert, key) = (tls.cert.display(), tls.key.display());
    for path in [&tls.cert, &tls.key] {
        std::fs::metadata(path)
            .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    }
    let loaded = pingora::tls::load_certs_and_key_files(&cert.to_string(), &key.to_string())
        .map_err(|e| fail(format!("cannot read {cert} / {key}: {e}")))?;
    let Some((chain, private_key)) = loaded else {
        return Err(fail(format!(
            "no certificate in {cert} or no private key in {key} (PEM expected)"
        )));
    };
    let chain = chain.into_iter().map(|c| c.into_owned()).collect();
    let provider = provider().ok_or_else(|| fail("no TLS crypto provider installed".into()))?;
    CertifiedKey::from_der(chain, private_key.clone_key(), &provider)
        .map(Arc::new)
        .map_err(|e| {
            fail(format!(
                "{cert} and {key} do not make a usable key pair: {e}"
            ))
        })
}

impl TlsListeners {
    /// Loads the certificate of every TLS listener of `config`.
    pub fn load(config: &Config) -> Result<TlsListeners, TlsError> {
        let mut stores = Vec::new();
        for (index, listener) in config.listeners.iter().enumerate() {
            if let Some(tls) = &listener.tls {
                let key = load_key(tls, index)?;
                let store = CertStore {
                    current: ArcSwap::new(key),
                };
                stores.push((listener.address, index, Arc::new(store)));
            }
        }
        Ok(TlsListeners { stores })
    }

    /// Pingora settings for the TLS listener on `address` (our resolver, ALPN h2 then
    /// http/1.1); None for a plain listener.
    pub fn settings(&self, address: SocketAddr) -> Result<Option<TlsSettings>, TlsError> {
        let Some((_, index, store)) = self.stores.iter().find(|(a, _, _)| *a == address) else {
            return Ok(None);
        };
        let (index, store) = (*index, store.clone());
        // The paths are never read: a resolver takes precedence over them.
        let mut settings = TlsSettings::intermediate("", "").map_err(|e| TlsError {
            index,
            reason: format!("TLS settings: {e}"),
        })?;
        settings.set_cert_resolver(store);
        settings.enable_h2();
        Ok(Some(settings))
    }

    fn store(&self, address: SocketAddr) -> Option<Arc<CertStore>> {
        self.stores
            .iter()
            .find(|(a, _, _)| *a == address)
            .map(|(_, _, s)| s.clone())
    }

    /// Reads the certificates `config` names for the running TLS listeners and, only if every
    /// one loads, swaps them in. Listeners that are new or no longer TLS change on restart.
    pub fn reload(&self, config: &Config) -> Result<usize, TlsError> {
        let mut fresh = Vec::new();
        for (index, listener) in config.listeners.iter().enumerate() {
            let (Some(tls), Some(store)) = (&listener.tls, self.store(listener.address)) else {
                continue;
            };
            fresh.push((store, load_key(tls, index)?));
        }
        let swapped = fresh.len();
        for (store, key) in fresh {
            store.current.store(key);
        }
        Ok(swapped)
    }
}
