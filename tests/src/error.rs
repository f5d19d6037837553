/// What can go wrong while playing the frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A local resource (memfd, eventfd, mapping) could not be set up.
    #[error("cannot set up {0}: {1}")]
    Setup(&'static str, #[source] std::io::Error),
    /// A vhost-user message failed (the daemon refused it or the connection is gone).
    #[error("vhost-user {0} failed: {1}")]
    Message(&'static str, #[source] vhost::Error),
    /// The daemon did not complete requests in time.
    #[error("queue {queue}: {got} of {want} chains used before the timeout")]
    Timeout {
        /// Queue index.
        queue: usize,
        /// Chains seen used.
        got: usize,
        /// Chains waited for.
        want: usize,
    },
    /// The daemon closed the connection.
    #[error("the daemon closed the connection")]
    Disconnected,
}

/// Result of the harness.
pub type Result<T> = std::result::Result<T, Error>;
