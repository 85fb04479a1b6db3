//! `tokengate completions SHELL` and `tokengate man`: shell completion scripts and man pages
//! generated from the clap definitions in [`super`], so they never drift from the real flags.
//! deploy/ packages both (deploy/completions.sh writes them at build time).
//!
//! Must never import `local` or `remote` (it only reads the command definitions).

use std::path::Path;

use clap::CommandFactory;

use super::print::outln;
use super::{Cli, CliError};

/// `tokengate completions SHELL`: the script on stdout.
pub fn completions(shell: clap_complete::Shell) -> Result<(), CliError> {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "tokengate", &mut buf);
    outln!("{}", String::from_utf8_lossy(&buf).trim_end());
    Ok(())
}

/// `tokengate man [--dir DIR]`: tokengate(1) on stdout, or one page per command (and group
/// command) written into DIR as `tokengate.1`, `tokengate-token.1`, `tokengate-token-create.1`…
pub fn man(dir: Option<&Path>) -> Result<(), CliError> {
    let cmd = Cli::command();
    let Some(dir) = dir else {
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut buf)
            .map_err(|e| CliError::failure(format!("cannot render the man page: {e}")))?;
        outln!("{}", String::from_utf8_lossy(&buf).trim_end());
        return Ok(());
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::failure(format!("cannot create {}: {e}", dir.display())))?;
    let mut written = 0usize;
    write_pages(cmd, "tokengate", dir, &mut written)?;
    eprintln!(
        "wrote {} into {}",
        super::print::plural(written, "man page", "man pages"),
        dir.display()
    );
    Ok(())
}

fn write_pages(
    cmd: clap::Command,
    name: &str,
    dir: &Path,
    written: &mut usize,
) -> Result<(), CliError> {
    let cmd = cmd.name(name.to_string());
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut buf)
        .and_then(|_| std::fs::write(&path, &buf))
        .map_err(|e| CliError::failure(format!("cannot write {}: {e}", path.display())))?;
    *written += 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub_name = format!("{name}-{}", sub.get_name());
        write_pages(sub.clone(), &sub_name, dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command and group command shows examples in its `--help`.
    #[test]
    fn every_command_has_examples_in_its_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let help = cmd
                .get_after_help()
                .map(|s| s.to_string())
                .unwrap_or_default();
            if !help.contains("Example") {
                missing.push(path.to_string());
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &format!("{path} {}", sub.get_name()), missing);
                }
            }
        }
        let mut missing = vec![];
        walk(&Cli::command(), "tokengate", &mut missing);
        assert!(missing.is_empty(), "no examples in --help of: {missing:?}");
    }

    #[test]
    fn man_pages_for_every_command() {
        let dir = tempfile::tempdir().unwrap();
        man(Some(dir.path())).unwrap();
        for page in [
            "tokengate.1",
            "tokengate-token-create.1",
            "tokengate-auth-refresh.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
            assert!(text.contains(".TH"), "{page}: {text}");
        }
    }
}
