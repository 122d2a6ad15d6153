//! `cargo xtask dump`: its arguments and what it shows.

use super::*;

#[derive(Debug, Args)]
pub struct DumpArgs {
    /// The dump (an ELF core file).
    pub(crate) file: PathBuf,
    /// hv's ELF, to name the function each CPU's RIP is in.
    #[arg(long, value_name = "FILE")]
    pub(crate) elf: Option<PathBuf>,
    /// Show every register of every CPU.
    #[arg(long, short)]
    pub(crate) verbose: bool,
    /// Print JSON instead.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Shows what a crash dump holds.
pub(super) fn run(args: DumpArgs) -> Result<ExitCode> {
    let info = DumpInfo::read(&args.file)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info.to_json())?);
    } else {
        let symbols = args.elf.as_deref().map(Symbols::load).transpose()?;
        print!("{}", info.render(args.verbose, symbols.as_ref()));
    }
    Ok(if info.problems().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
