use clap::Parser;
use orders_gateway::app::{App, init_tracing, shutdown_signal};
use orders_gateway::config::{Cli, Command};
use orders_gateway::db::Database;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line naming the variable, e.g. "invalid value 'x' for
            // '--bind-addr <BIND_ADDR>': invalid socket address syntax".
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!(
                "orders-gateway: invalid configuration: {}",
                first.trim_start_matches("error: ")
            );
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    };
    let mut config = cli.config;
    if let Err(e) = config.validate() {
        eprintln!("orders-gateway: {e}");
        std::process::exit(2);
    }
    init_tracing(&config.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
    let result = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Migrate => {
                let url = config
                    .database_url
                    .as_deref()
                    .ok_or_else(|| anyhow::anyhow!("DATABASE_URL: required by migrate"))?;
                Database::connect(url)?.migrate().await?;
                println!("migrations applied");
                Ok(())
            }
            Command::Serve => App::build(config).await?.run(shutdown_signal()).await,
        }
    });
    if let Err(e) = result {
        eprintln!("orders-gateway: {e:#}");
        std::process::exit(1);
    }
}
