//! Collected, non-fatal diagnostics.
//!
//! Modules push warnings here instead of printing them, so that the caller decides where they go
//! (stderr, always prefixed with `Warning: `). A warning must never contain a secret.

/// An ordered list of warnings.
#[derive(Debug, Default)]
pub struct Warnings {
    items: Vec<String>,
}

impl Warnings {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, message: impl Into<String>) {
        self.items.push(message.into());
    }

    /// Prints every collected warning to stderr and empties the list.
    pub fn flush_to_stderr(&mut self) {
        for item in self.items.drain(..) {
            eprintln!("Warning: {item}");
        }
    }
}
