//! The CLI's half: one request, the events back.
use std::path::Path;

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::{error::InputError, status::Status};

use super::{Event, Request};

/// Sends `request` and calls `on_event` for every event until the connection
/// closes.
pub async fn call(socket: &Path, request: &Request, mut on_event: impl FnMut(Event)) -> Result<()> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        InputError::new(format!(
            "cannot reach the supervisor at {} ({e}); is `supervisor run` running with this config?",
            socket.display()
        ))
    })?;
    // Only a daemon of root's or ours is believed, and only one that will answer us.
    crate::trust::check_daemon(stream.peer_cred()?.uid(), socket)?;
    let mut stream = BufReader::new(stream);
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.get_mut().write_all(line.as_bytes()).await?;
    let mut lines = stream.lines();
    while let Some(line) = lines.next_line().await? {
        on_event(serde_json::from_str(&line).with_context(|| format!("malformed reply {line:?}"))?);
    }
    Ok(())
}

/// How long the CLI waits for the daemon's answer to a status request.
pub const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One `status` request, bounded by [`STATUS_TIMEOUT`].
pub async fn fetch_status(socket: &Path) -> Result<Status> {
    let mut status = None;
    let call = call(socket, &Request::Status, |event| {
        if let Event::Status { status: value } = event {
            status = Some(*value);
        }
    });
    match tokio::time::timeout(STATUS_TIMEOUT, call).await {
        Ok(result) => result?,
        Err(_) => anyhow::bail!("the supervisor did not answer within {STATUS_TIMEOUT:?}"),
    }
    status.ok_or_else(|| anyhow::anyhow!("no status from the supervisor"))
}
