//! Listeners: binding (one SO_REUSEPORT socket per worker), the HTTP accept loop (HTTP/1.1
//! and h2c on one port, upgrades), attache's own HTTP/1.1 server side, and the TCP accept
//! loop.

pub mod h1;
pub mod http;
pub mod tcp;

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Binds a listening socket that other workers can bind too (SO_REUSEPORT): the kernel spreads
/// connections over the workers, and no worker waits on another's accept lock.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds `workers` sockets for `addr`. Port 0 means "any free port": the first socket picks
/// it and the others share it.
pub fn bind_all(
    addr: SocketAddr,
    workers: usize,
) -> std::io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let first = bind_reuseport(addr)?;
    let bound = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(bind_reuseport(bound)?);
    }
    Ok((bound, sockets))
}
