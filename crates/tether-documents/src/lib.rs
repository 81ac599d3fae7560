//! Tether's picture of individual documents (sticky keys), without sockets: which documents are
//! hottest by requests per second and by bytes per second, in memory bounded by a capacity
//! whatever the number of distinct keys ([`HotKeys`]).

mod hot;

pub use hot::{Hot, HotKeys};
