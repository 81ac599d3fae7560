//! A request described in words (method, host, path, `Name:Value` headers, `name=value`
//! cookies and query parameters) rather than received: what `tether route` and the admin
//! API's `GET /route` turn into a [`RequestView`] so both answer exactly as the proxy would.

use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue, COOKIE};

use crate::RequestView;

/// An owned request description.
#[derive(Debug, Clone, Default)]
pub struct DescribedRequest {
    method: String,
    host: Option<String>,
    path: String,
    query: String,
    headers: http::HeaderMap,
    cookies: Vec<String>,
    client_ip: Option<IpAddr>,
}

impl DescribedRequest {
    /// `method` (upper-cased), optional `host`, and a path that may carry a `?query`.
    pub fn new(method: &str, host: Option<&str>, path_and_query: &str) -> DescribedRequest {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        DescribedRequest {
            method: method.to_ascii_uppercase(),
            host: host.map(str::to_string),
            path: if path.is_empty() {
                "/".into()
            } else {
                path.into()
            },
            query: query.to_string(),
            ..DescribedRequest::default()
        }
    }

    /// Adds a header given as `Name:Value`.
    pub fn header(&mut self, spec: &str) -> Result<(), String> {
        let (name, value) = spec
            .split_once(':')
            .ok_or_else(|| format!("header {spec:?}: expected Name:Value"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("header {spec:?}: bad header name"))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| format!("header {spec:?}: bad header value"))?;
        self.headers.append(name, value);
        Ok(())
    }

    /// Adds a cookie given as `name=value`.
    pub fn cookie(&mut self, spec: &str) -> Result<(), String> {
        if !spec.contains('=') {
            return Err(format!("cookie {spec:?}: expected name=value"));
        }
        self.cookies.push(spec.trim().to_string());
        let joined = HeaderValue::from_str(&self.cookies.join("; "))
            .map_err(|_| format!("cookie {spec:?}: bad cookie value"))?;
        self.headers.insert(COOKIE, joined);
        Ok(())
    }

    /// Adds a query parameter given as `name=value` (raw, as it would appear in the URL).
    pub fn query(&mut self, spec: &str) {
        if !self.query.is_empty() {
            self.query.push('&');
        }
        self.query.push_str(spec);
    }

    /// Sets the client address (for `on_missing: client_ip`).
    pub fn client_ip(&mut self, ip: Option<IpAddr>) {
        self.client_ip = ip;
    }

    /// The view the router decides on.
    pub fn view(&self) -> RequestView<'_> {
        RequestView {
            method: &self.method,
            host: self.host.as_deref(),
            path: &self.path,
            query: (!self.query.is_empty()).then_some(self.query.as_str()),
            headers: crate::Headers::Map(&self.headers),
            client_ip: self.client_ip,
        }
    }
}
