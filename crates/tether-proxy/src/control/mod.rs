//! The control side, apart from the data path: the admin listener, config reload, active
//! health checks, convergence of open streams when key owners change, membership discovery
//! and the graceful stop. It changes the running state only through `crate::state`.

pub mod admin;
pub mod convergence;
pub mod discovery;
pub mod health;
pub mod lifecycle;
pub mod pins;
pub mod reload;
