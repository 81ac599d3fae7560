//! [`Headers`]: the request's header fields as either parser left them, so that Tether's own
//! HTTP/1 path can route without building an `http::HeaderMap` per request.

use http::{HeaderMap, HeaderName};

/// A request's header fields.
#[derive(Debug, Clone, Copy)]
pub enum Headers<'a> {
    /// Parsed into a map (Pingora's request header, tests, the CLI).
    Map(&'a HeaderMap),
    /// As `httparse` left them, in wire order (Tether's HTTP/1 keep-alive path).
    Raw(&'a [httparse::Header<'a>]),
}

impl<'a> Headers<'a> {
    /// Every value of the field `name`, in the order received.
    pub fn values<'n>(self, name: &'n HeaderName) -> Values<'a, 'n> {
        match self {
            Headers::Map(map) => Values::Map(map.get_all(name).iter()),
            Headers::Raw(fields) => Values::Raw {
                fields: fields.iter(),
                name: name.as_str(),
            },
        }
    }
}

impl<'a> From<&'a HeaderMap> for Headers<'a> {
    fn from(map: &'a HeaderMap) -> Headers<'a> {
        Headers::Map(map)
    }
}

/// The values of one field name, from [`Headers::values`].
pub enum Values<'a, 'n> {
    /// From a map.
    Map(http::header::ValueIter<'a, http::HeaderValue>),
    /// From raw fields, matched by name case-insensitively.
    Raw {
        /// Fields not looked at yet.
        fields: std::slice::Iter<'a, httparse::Header<'a>>,
        /// The name sought, lower-case.
        name: &'n str,
    },
}

impl<'a> Iterator for Values<'a, '_> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            // A field value excludes the whitespace around it (RFC 9110 5.5): httparse trims
            // it, an HTTP/2 field may still carry it, so both give the same key.
            Values::Map(values) => values.next().map(|v| v.as_bytes().trim_ascii()),
            Values::Raw { fields, name } => fields
                .find(|field| field.name.eq_ignore_ascii_case(name))
                .map(|field| field.value.trim_ascii()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_map_headers_give_the_same_values_in_order() {
        let raw = [
            httparse::Header {
                name: "X-Doc-Id",
                value: b"a",
            },
            httparse::Header {
                name: "Cookie",
                value: b"x=1",
            },
            httparse::Header {
                name: "x-doc-id",
                value: b"b",
            },
        ];
        let mut map = HeaderMap::new();
        for field in &raw {
            map.append(
                HeaderName::from_bytes(field.name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(field.value).unwrap(),
            );
        }
        let name = HeaderName::from_static("x-doc-id");
        let from_raw: Vec<_> = Headers::Raw(&raw).values(&name).collect();
        let from_map: Vec<_> = Headers::Map(&map).values(&name).collect();
        assert_eq!(from_raw, vec![&b"a"[..], &b"b"[..]]);
        assert_eq!(from_raw, from_map);
        let absent = HeaderName::from_static("accept");
        assert_eq!(Headers::Raw(&raw).values(&absent).count(), 0);
    }
}
