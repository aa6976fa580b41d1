//! How a command's failure becomes its exit code (SPEC §1): 1 when the
//! operator's input or configuration is at fault, 2 when the environment is
//! (a port in use, a store that cannot be reached). Every command's start-up
//! error says which by implementing [`Failure`].

/// The exit code of a failed command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Invalid input or configuration.
    Invalid = 1,
    /// A failure of the environment.
    Runtime = 2,
}

/// An error that ends a command.
pub trait Failure: std::error::Error {
    /// Whose fault it is.
    fn exit(&self) -> Exit;
}
