//! The `attache` command: `run`, `check`, `explain`, `demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use attache::config::Config;
use attache::server::Server;

/// attache: an ambassador sidecar.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Where the JSON access log goes: off, stdout or a file path (overrides the config).
        #[arg(long)]
        access_log: Option<String>,
    },
    /// Validate a config file: every error with file:line:column and the field path.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show which listener, route, cluster and endpoints a request would get, without sending it.
    Explain {
        #[arg(long, short)]
        config: PathBuf,
        /// The request method.
        #[arg(short = 'X', long = "request", default_value = "GET")]
        method: String,
        /// A request header, `name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The request URL, e.g. http://127.0.0.1:10000/images/priya/1.png
        url: String,
    },
    /// Run the seed's image-sharing system on this machine: feed, users, two image-store
    /// shards and attache between them, with fault controls on the admin listener.
    Demo {
        /// Once everything is ready, print one JSON line with the URLs (then keep running).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ATTACHE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("attache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}", c.summary());
                Ok(ExitCode::SUCCESS)
            }
            Err(errors) => {
                eprintln!("{errors}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Run { config, access_log } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let server = Server::bind(config, access_log.as_deref())?;
            server.run(std::future::pending())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { json } => {
            attache::demo::run(json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain {
            config,
            method,
            headers,
            json,
            url,
        } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let mut req = http::Request::builder()
                .method(method.as_str())
                .uri(url.as_str());
            for h in &headers {
                let (name, value) = h
                    .split_once(':')
                    .with_context(|| format!("header `{h}` is not `name: value`"))?;
                req = req.header(name.trim(), value.trim());
            }
            let req = req.body(()).context("invalid request")?;
            let e = attache::explain::explain(&config, &req);
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                println!("{e}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
