//! The Conclave server: the listener, one session per connection, the hub that decides who
//! receives what, and the store.
//!
//! Sockets, TLS and disk live at the edges ([`server`], [`session`], [`store`]); the routing and
//! permission decisions live in [`hub`], which is plain data and functions that tests drive
//! without sockets.

pub mod accounts;
pub mod admin_socket;
pub mod alerts;
pub mod anomaly;
pub mod at_rest;
pub mod audit;
pub mod bus;
pub mod bus_nats;
pub mod canary;
pub mod certs;
pub mod cluster;
pub mod cluster_events;
pub mod cmd;
pub mod config;
pub mod conn;
pub mod connection;
pub mod dispatch;
pub mod e2ee;
pub mod files;
pub mod fsutil;
pub mod guard;
pub mod hub;
pub mod metrics;
pub mod monitor;
pub mod outbox;
pub mod presence;
pub mod prometheus;
pub mod registry;
pub mod replies;
pub mod search;
pub mod server;
pub mod session;
pub mod shared_hub;
pub mod state;
pub mod store;
pub mod store_pg;
pub mod tls;
pub mod tls_stream;
pub mod web;

pub use config::{Config, RegistrationPolicy};
pub use server::{Server, StartError};
