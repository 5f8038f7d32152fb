//! redirector
pub mod frame;
pub mod policy;
