//! The README's option table is the one `ltsp-agent options` prints: they cannot drift.

#[test]
fn readme_lists_every_cmdline_option_with_its_default() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for (name, default, meaning) in ltsp_common::cmdline::OPTIONS {
        let cell = |s: &str| s.replace('|', "\\|");
        let row = format!(
            "| `{}` | {} | {} |",
            cell(name),
            cell(default),
            cell(meaning)
        );
        assert!(readme.contains(&row), "README.md lacks the row:\n{row}");
    }
}

/// docs/architecture.md has a row for every boot step and names every timeline mark.
#[test]
fn architecture_lists_every_step_and_timeline_mark() {
    use ltsp_common::step::{Mark, Step};
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/architecture.md"
    ))
    .unwrap();
    for step in Step::ALL {
        let brk = if step.can_break() {
            format!("`{}`", step.name())
        } else {
            "(none: before the cmdline)".into()
        };
        let row = format!("| `{}` | {brk} |", step.name());
        assert!(
            doc.contains(&row),
            "docs/architecture.md lacks the row {row}"
        );
    }
    for mark in Mark::ALL {
        assert!(
            doc.contains(&format!("`{}`", mark.name())),
            "docs/architecture.md lacks the timeline mark {}",
            mark.name()
        );
    }
}
