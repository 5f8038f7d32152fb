//! redirector
pub mod frame;
pub mod ghost;
pub mod policy;
