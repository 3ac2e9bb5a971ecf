//! The `onsip-ua-exporter` binary: parse flags, set up logging, run, map the
//! outcome to an exit code (0 ok, 1 bad configuration or start-up failure).

use std::process::ExitCode;

use clap::Parser;
use onsip_ua_exporter::app;
use onsip_ua_exporter::config::{Cli, Command, Config, ProcessEnv};
use onsip_ua_exporter::telemetry;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        None | Some(Command::Run) => runtime.block_on(run(&cli.flags)),
        Some(Command::CheckConfig) => check_config(&cli.flags),
        Some(Command::Demo(args)) => {
            runtime.block_on(onsip_ua_exporter::demo::run(args, shutdown_signal()))
        }
        Some(Command::Simulate(args)) => {
            runtime.block_on(onsip_ua_exporter::simulate::run(args, shutdown_signal()))
        }
    }
}

fn check_config(flags: &onsip_ua_exporter::config::Flags) -> ExitCode {
    match Config::load(flags, &ProcessEnv) {
        Ok(config) => {
            println!("configuration is valid");
            println!("  jid: {}", config.full_jid());
            println!("  server: {:?}", config.xmpp.server);
            println!("  nodes: {}", config.onsip.nodes.join(", "));
            println!(
                "  listen: {}{}",
                config.listen_address, config.telemetry_path
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("invalid configuration: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(flags: &onsip_ua_exporter::config::Flags) -> ExitCode {
    let config = match Config::load(flags, &ProcessEnv) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("invalid configuration: {err}");
            return ExitCode::FAILURE;
        }
    };
    telemetry::init(&config.log_level, config.log_format);
    info!(
        version = app::BUILD.version,
        revision = app::BUILD.revision,
        jid = %config.full_jid(),
        server = ?config.xmpp.server,
        nodes = %config.onsip.nodes.join(","),
        "starting onsip-ua-exporter"
    );
    let cancel = CancellationToken::new();
    let exporter = match app::start(config, cancel.clone()).await {
        Ok(exporter) => exporter,
        Err(err) => {
            error!(cause = %err, "cannot start");
            eprintln!("cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    shutdown_signal().await;
    info!("shutting down");
    cancel.cancel();
    exporter.stopped().await;
    ExitCode::SUCCESS
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
