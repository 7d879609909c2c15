//! File-system changes: atomic file replacement and the key directory.

pub mod atomic;
pub mod secrets_dir;
