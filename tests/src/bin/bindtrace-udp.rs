//! A tiny UDP tool for the Docker tests, whose busybox image has no UDP server: copied into the
//! image with the libraries it links (see `docker::Image::with_udp_tool`).
//!
//! `bindtrace-udp serve ADDR:PORT` binds and echoes every datagram back, forever.
//! `bindtrace-udp send ADDR:PORT` sends one datagram and exits 0.
use std::{net::UdpSocket, process::ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(mode), Some(addr)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: bindtrace-udp serve|send ADDR:PORT");
        return ExitCode::from(2);
    };
    let result = match mode.as_str() {
        "serve" => serve(addr),
        "send" => UdpSocket::bind(if addr.starts_with('[') { "[::]:0" } else { "0.0.0.0:0" })
            .and_then(|s| s.send_to(b"bindtrace udp test", addr.as_str()).map(drop)),
        _ => {
            eprintln!("unknown mode {mode:?}: serve or send");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bindtrace-udp {mode} {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(addr: &str) -> std::io::Result<()> {
    let sock = UdpSocket::bind(addr)?;
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = sock.recv_from(&mut buf)?;
        sock.send_to(&buf[..n], from)?;
    }
}
