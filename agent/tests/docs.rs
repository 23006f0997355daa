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
