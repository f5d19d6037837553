use std::os::unix::io::RawFd;
use std::path::PathBuf;

// Command-line options every daemon shares; `#[command(flatten)]` them into the daemon's CLI.
// Daemon options that are required for normal operation should be declared with
// `required_unless_present = "print_capabilities"`.
//
// A plain comment on purpose: clap turns a doc comment on a flattened struct into the
// program's `about`/`long_about`, which would replace each daemon's own description.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DaemonArgs {
    /// vhost-user Unix socket to listen on (or to connect to with --client).
    #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Serve an inherited Unix socket that is already listening, by file descriptor number.
    #[arg(long, value_name = "N", conflicts_with_all = ["socket", "client"])]
    pub fd: Option<RawFd>,

    /// Connect to a socket the frontend listens on, retrying until it appears, and reconnect
    /// whenever the frontend goes away.
    #[arg(long, requires = "socket")]
    pub client: bool,

    /// Serve a single frontend connection, then exit (default: serve the next one).
    #[arg(long)]
    pub once: bool,

    /// Print the backend capabilities as JSON (vhost-user spec) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Log level: off, error, warn, info, debug, trace (default: RUST_LOG, else info).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,
}
