//! Running as an AWS IoT Greengrass v2 component: detecting the nucleus, the IPC connection to
//! it (`ipc`), configuration from the component's configuration with live updates and
//! deployment validation, and lifecycle state (`component`), client device auth for agents
//! (`devices`), and the component's main loop (`runner`).
//!
//! Guarantees:
//! - The gateway is a component when the nucleus set `SVCUID` and
//!   `AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT` (a relative socket path is resolved
//!   against the working directory, as the Java nucleus intends for long paths).
//! - Its configuration is the component configuration minus `accessControl`, validated by the
//!   same model and errors as a config file; `upstream` defaults to `{"kind": "greengrass"}`.

pub mod component;
pub mod devices;
pub mod ipc;
pub mod runner;

use std::path::PathBuf;

/// The nucleus's IPC socket and this component's token, from the environment.
#[derive(Debug, Clone)]
pub struct Environment {
    pub socket: PathBuf,
    pub token: String,
}

/// The environment variables the nucleus sets for a component.
pub const SOCKET_VAR: &str = "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT";
pub const TOKEN_VAR: &str = "SVCUID";

impl Environment {
    /// `Some` when running under a Greengrass nucleus.
    pub fn detect() -> Option<Environment> {
        let socket = std::env::var_os(SOCKET_VAR).filter(|s| !s.is_empty())?;
        let token = std::env::var(TOKEN_VAR).ok().filter(|s| !s.is_empty())?;
        let mut socket = PathBuf::from(socket);
        if socket.is_relative()
            && let Ok(cwd) = std::env::current_dir()
        {
            socket = cwd.join(socket);
        }
        Some(Environment { socket, token })
    }
}
