//! A TCP fault proxy for tests and benchmarks between two dmrep sites on one machine.
//!
//! The kernel here has no netem, so the WAN between a primary and its secondary is
//! imitated in user space: the replication link connects to the proxy instead of the
//! peer, and the proxy forwards each accepted connection to the peer (the *target*),
//! bytes both ways, without looking at them (TLS passes through). *Up* is client to
//! target, *down* target to client.
//!
//! Use it in-process from Rust tests ([`FaultProxy`]), or as the `dmrep-faultproxy`
//! binary with a control socket speaking the line protocol of [`command`].
//!
//! # Faults, and the WAN failure each imitates
//!
//! - **delay** (`delay MS`, [`FaultProxy::set_delay`]): a one-way delay added to each
//!   direction: data read at `t` is written at `t + MS`, in order, so a round trip gains
//!   `2 × MS`. Each direction is a timestamped queue, not a sleep per chunk, so many
//!   chunks are in flight and throughput is not capped by the delay (up to
//!   [`QUEUE_LIMIT`] per direction and connection in flight). Imitates propagation
//!   latency of a long-haul link: what the bandwidth-delay product does to a
//!   synchronous or windowed replication protocol.
//! - **rate** (`rate BYTES_PER_S|off`, [`FaultProxy::set_rate`]): a token bucket per
//!   direction, shared by all connections in that direction, with bursts of at most
//!   rate/50 and never over 64 KiB. Imitates a bottleneck: a provisioned WAN circuit,
//!   a VPN or a shaped uplink that every connection between the sites shares. A 64 KiB
//!   burst lasts 0.65 ms at 100 MB/s, so at such rates on a busy machine a late-waking
//!   writer loses tokens and the rate reached falls short (about 90% of 100 MB/s with
//!   two loaded cores); below ~25 MB/s it is within a few percent.
//! - **drop** (`drop`, [`FaultProxy::drop_connections`]): resets every open
//!   connection on both sides (SO_LINGER 0, then close: an RST, no FIN). Imitates a
//!   middlebox that loses its state and resets sessions, a peer that crashed and
//!   rebooted, a link flap noticed at once: both ends learn immediately and must
//!   reconnect.
//! - **blackhole** (`blackhole on|off`, [`FaultProxy::blackhole`]): connections stay
//!   open but nothing is forwarded either way and nothing is sent back, not even a
//!   FIN or an RST; what arrives is discarded. New connections are accepted and go
//!   nowhere. Imitates a silent partition: a cut fibre, a routing black hole, a
//!   firewall that starts dropping packets: neither end is told, only timeouts and
//!   heartbeats notice. On `off`, new connections work again and the connections that
//!   were blackholed are reset, as the state of a NAT or firewall on the path would be
//!   gone after such an outage. Unlike a real partition, the kernel under the proxy
//!   still acknowledges what the sender writes, so the sender's writes keep succeeding
//!   instead of filling its send buffer: detection must come from the application's own
//!   timeouts.
//! - **stall** (`stall up|down on|off`, [`FaultProxy::stall`]): one direction stops;
//!   its data is held, not discarded, and flows again on `off`; once [`QUEUE_LIMIT`]
//!   is held, TCP flow control pushes back on the sender. Imitates a one-way failure:
//!   asymmetric routing gone wrong, a congested or frozen path in one direction, a
//!   receiver that stops reading; data sent meanwhile arrives late, not never.
//! - **refuse** (`refuse on|off`, [`FaultProxy::refuse`]): new connections are
//!   accepted and reset at once. Imitates the remote site's service being down (the
//!   port closed, connection refused); a user-space proxy cannot refuse the handshake
//!   itself, so the client's `connect` succeeds and its first read fails.
//!
//! [`FaultProxy::stats`] (`stats`) counts connections accepted, refused and active, and
//! bytes forwarded each way.

mod bucket;
pub mod command;
mod proxy;

pub use command::{Command, ParseError};
pub use proxy::{Direction, FaultProxy, ProxyStats, CHUNK, QUEUE_LIMIT};
