//! A certificate authority made in the test, for TLS listeners.

use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};

/// A test CA that signs `localhost` leaves.
pub struct Ca {
    /// The CA certificate (clients trust its DER).
    pub cert: Certificate,
    key: KeyPair,
}

impl Ca {
    /// A fresh CA.
    pub fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        Ca { cert, key }
    }

    /// A leaf for `localhost`: (certificate PEM, key PEM, certificate DER).
    pub fn leaf(&self) -> (String, String, Vec<u8>) {
        let params = CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf cert");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}
