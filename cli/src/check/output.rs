//! The three output formats of `check` and the two of `check-list` (spec aziotctl.md §4.3, §4.6).

use std::collections::BTreeMap;
use std::io::{self, IsTerminal as _, Write as _};

use serde_json::{Map, Value};

use super::{Done, Outcome, CHECKS, CONFIGURATION, CONNECTIVITY};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
    JsonStream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ListFormat {
    Text,
    Json,
}

#[derive(Clone, Copy)]
enum Colour {
    Green,
    Yellow,
    Red,
}

pub struct Printer {
    format: OutputFormat,
    verbose: bool,
    colour: bool,
    /// JSON: every check, keyed (and so sorted) by ID.
    checks: BTreeMap<&'static str, String>,
    ok: usize,
    warnings: usize,
    errors: usize,
    skipped: usize,
    stopped: bool,
}

/// `{"result":"<r>"[,"details":[...]]}`, in that member order (serde_json's maps sort keys).
fn result_json(outcome: &Outcome) -> String {
    let (name, details) = match outcome {
        Outcome::Ok => ("ok", None),
        Outcome::Ignored => ("ignored", None),
        Outcome::Skipped => ("skipped", None),
        Outcome::Warning(d) => ("warning", Some(d)),
        Outcome::Error(d) => ("error", Some(d)),
        Outcome::Fatal(d) => ("fatal", Some(d)),
    };
    match details {
        None => format!(r#"{{"result":"{name}"}}"#),
        Some(d) => format!(
            r#"{{"result":"{name}","details":{}}}"#,
            Value::from(d.clone())
        ),
    }
}

impl Printer {
    pub fn new(format: OutputFormat, verbose: bool) -> Printer {
        // The usual conventions: colour on a terminal, unless NO_COLOR; CLICOLOR_FORCE forces it.
        let forced = std::env::var_os("CLICOLOR_FORCE").is_some_and(|v| v != "0");
        let colour = forced
            || (io::stdout().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                && std::env::var_os("CLICOLOR").is_none_or(|v| v != "0"));
        Printer {
            format,
            verbose,
            colour,
            checks: BTreeMap::new(),
            ok: 0,
            warnings: 0,
            errors: 0,
            skipped: 0,
            stopped: false,
        }
    }

    fn paint(&self, colour: Colour, text: &str) -> String {
        if !self.colour {
            return text.to_owned();
        }
        let code = match colour {
            Colour::Green => "32",
            Colour::Yellow => "33",
            Colour::Red => "31",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }

    /// A new section begins (`previous` is "" for the first).
    pub fn section(&mut self, previous: &str, name: &str) -> io::Result<()> {
        let mut out = io::stdout().lock();
        match self.format {
            OutputFormat::Text => {
                if !previous.is_empty() {
                    writeln!(out)?;
                }
                writeln!(out, "{name}\n{}", "-".repeat(name.chars().count()))?;
            }
            OutputFormat::JsonStream => {
                write!(out, r#"{{"kind":"section","name":{}}}"#, Value::from(name))?;
                out.flush()?;
            }
            OutputFormat::Json => {}
        }
        Ok(())
    }

    pub fn check(&mut self, done: Done) -> io::Result<()> {
        match &done.outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Warning(_) => self.warnings += 1,
            Outcome::Error(_) | Outcome::Fatal(_) => self.errors += 1,
            Outcome::Skipped => self.skipped += 1,
            Outcome::Ignored => {}
        }
        let mut out = io::stdout().lock();
        match self.format {
            OutputFormat::Text => {
                let desc = done.check.description;
                let lines = |out: &mut io::StdoutLock<'_>,
                             colour: Colour,
                             d: &[String]|
                 -> io::Result<()> {
                    let (first, causes) = d
                        .split_first()
                        .map(|(f, c)| (f.as_str(), c))
                        .unwrap_or(("", &[]));
                    for l in first.lines() {
                        writeln!(out, "{}", self.paint(colour, &format!("    {l}")))?;
                    }
                    if self.verbose {
                        for cause in causes {
                            let mut ls = cause.lines();
                            if let Some(l) = ls.next() {
                                writeln!(
                                    out,
                                    "{}",
                                    self.paint(colour, &format!("        caused by: {l}"))
                                )?;
                            }
                            for l in ls {
                                writeln!(
                                    out,
                                    "{}",
                                    self.paint(colour, &format!("{}{l}", " ".repeat(19)))
                                )?;
                            }
                        }
                    }
                    Ok(())
                };
                match &done.outcome {
                    Outcome::Ok => writeln!(
                        out,
                        "{}",
                        self.paint(Colour::Green, &format!("\u{221a} {desc} - OK"))
                    )?,
                    Outcome::Warning(d) => {
                        writeln!(
                            out,
                            "{}",
                            self.paint(Colour::Yellow, &format!("\u{203c} {desc} - Warning"))
                        )?;
                        lines(&mut out, Colour::Yellow, d)?;
                    }
                    Outcome::Error(d) | Outcome::Fatal(d) => {
                        writeln!(
                            out,
                            "{}",
                            self.paint(Colour::Red, &format!("\u{d7} {desc} - Error"))
                        )?;
                        lines(&mut out, Colour::Red, d)?;
                    }
                    Outcome::Skipped if self.verbose => {
                        writeln!(
                            out,
                            "{}",
                            self.paint(Colour::Yellow, &format!("\u{203c} {desc} - Warning"))
                        )?;
                        writeln!(
                            out,
                            "{}",
                            self.paint(Colour::Yellow, "    skipping because of previous failures")
                        )?;
                    }
                    Outcome::Skipped | Outcome::Ignored => {}
                }
            }
            OutputFormat::JsonStream => {
                write!(
                    out,
                    r#"{{"kind":"check","id":{},"description":{},"result":{},"additional_info":{}}}"#,
                    Value::from(done.check.id),
                    Value::from(done.check.description),
                    result_json(&done.outcome),
                    Value::Object(done.additional),
                )?;
                out.flush()?;
            }
            OutputFormat::Json => {
                self.checks.insert(
                    done.check.id,
                    format!(
                        r#"{{"result":{},"additional_info":{}}}"#,
                        result_json(&done.outcome),
                        Value::Object(done.additional)
                    ),
                );
            }
        }
        Ok(())
    }

    /// A fatal result stopped the run: the current section's blank line is not printed.
    pub fn stopped(&mut self) {
        self.stopped = true;
    }

    pub fn finish(self, info: Map<String, Value>) -> io::Result<()> {
        let mut out = io::stdout().lock();
        match self.format {
            OutputFormat::Text => {
                if !self.stopped {
                    writeln!(out)?;
                }
                let more = if self.verbose {
                    ""
                } else {
                    " Re-run with --verbose for more details."
                };
                writeln!(
                    out,
                    "{}",
                    self.paint(Colour::Green, &format!("{} check(s) succeeded.", self.ok))
                )?;
                if self.warnings > 0 {
                    writeln!(
                        out,
                        "{}",
                        self.paint(
                            Colour::Yellow,
                            &format!("{} check(s) raised warnings.{more}", self.warnings)
                        )
                    )?;
                }
                if self.errors > 0 {
                    writeln!(
                        out,
                        "{}",
                        self.paint(
                            Colour::Red,
                            &format!("{} check(s) raised errors.{more}", self.errors)
                        )
                    )?;
                }
                if self.skipped > 0 {
                    writeln!(
                        out,
                        "{}",
                        self.paint(
                            Colour::Yellow,
                            &format!(
                                "{} check(s) were skipped due to errors from other checks.{more}",
                                self.skipped
                            )
                        )
                    )?;
                }
                writeln!(out)?;
            }
            OutputFormat::Json => {
                let checks: Vec<String> = self
                    .checks
                    .iter()
                    .map(|(id, v)| format!("{}:{v}", Value::from(*id)))
                    .collect();
                writeln!(
                    out,
                    r#"{{"additional_info":{},"checks":{{{}}}}}"#,
                    Value::Object(info),
                    checks.join(",")
                )?;
            }
            OutputFormat::JsonStream => {
                let inner = Value::Object(info).to_string();
                let members = &inner[1..inner.len() - 1];
                let sep = if members.is_empty() { "" } else { "," };
                writeln!(out, r#"{{"kind":"additional_info"{sep}{members}}}"#)?;
            }
        }
        out.flush()
    }
}

/// `check-list` (§4.6).
pub fn list(format: ListFormat) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match format {
        ListFormat::Text => {
            let cat_w = CHECKS
                .iter()
                .map(|c| c.section.len())
                .chain(["CATEGORY".len()])
                .max()
                .unwrap_or(0)
                + 1;
            let id_w = CHECKS
                .iter()
                .map(|c| c.id.len())
                .chain(["ID".len()])
                .max()
                .unwrap_or(0)
                + 1;
            writeln!(out, "{:cat_w$}{:id_w$}DESCRIPTION", "CATEGORY", "ID")?;
            writeln!(out)?;
            let mut section = CHECKS[0].section;
            for c in CHECKS {
                if c.section != section {
                    writeln!(out)?;
                    section = c.section;
                }
                writeln!(out, "{:cat_w$}{:id_w$}{}", c.section, c.id, c.description)?;
            }
            writeln!(out)?;
        }
        ListFormat::Json => {
            // Sections sorted by name, checks in execution order, `id` before `description`.
            let mut sections = [CONFIGURATION, CONNECTIVITY];
            sections.sort_unstable();
            let body: Vec<String> = sections
                .iter()
                .map(|section| {
                    let checks: Vec<String> = CHECKS
                        .iter()
                        .filter(|c| c.section == *section)
                        .map(|c| {
                            format!(
                                r#"{{"id":{},"description":{}}}"#,
                                Value::from(c.id),
                                Value::from(c.description)
                            )
                        })
                        .collect();
                    format!("{}:[{}]", Value::from(*section), checks.join(","))
                })
                .collect();
            write!(out, "{{{}}}", body.join(","))?;
        }
    }
    out.flush()
}
