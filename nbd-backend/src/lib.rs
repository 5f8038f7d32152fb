//! nbd-backend
