//! serde_yaml's errors, rewritten for users.

use super::*;

/// Turns a serde_yaml error into one [`ConfigError`]. serde_yaml writes
/// `PATH: MESSAGE at line L column C`, where PATH (like `vms[0].limits`) is
/// left out at the top level and the location where unknown.
pub(super) fn from_yaml(file: &Path, source: &str, error: &serde_yaml::Error) -> ConfigError {
    let location = error.location().map(|l| Location {
        line: l.line(),
        column: l.column(),
    });
    let mut text = error.to_string();
    if let Some(l) = &location {
        text = text.replacen(&format!(" at line {} column {}", l.line, l.column), "", 1);
    }
    let (path, message) = match text.split_once(": ") {
        Some((p, m)) if is_yaml_path(p) => (p.to_string(), m.to_string()),
        _ => (String::new(), text),
    };
    let join = |field: &str| {
        if path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        }
    };
    let (kind, key, message) = if let Some(rest) = message.strip_prefix("unknown field ") {
        let quoted = backticked(rest);
        let field = quoted.first().cloned().unwrap_or_default();
        let known: Vec<String> = quoted.into_iter().skip(1).collect();
        let mut m = format!("unknown key \"{field}\"");
        if field == "<<" {
            m.push_str(
                ": YAML merge keys are not supported; put shared settings under `defaults:` or \
                 repeat them",
            );
        } else if let Some(close) = closest(&field, &known) {
            m.push_str(&format!(": did you mean \"{close}\"?"));
        } else {
            m.push_str(": remove it or fix its spelling");
        }
        if !known.is_empty() {
            m.push_str(&format!(" (keys here: {})", known.join(", ")));
        }
        (ConfigErrorKind::UnknownKey, join(&field), m)
    } else if let Some(rest) = message.strip_prefix("missing field ") {
        let field = backticked(rest).into_iter().next().unwrap_or_default();
        let what = match field.as_str() {
            "vms" => "list the VMs to run under `vms:`",
            "name" => "give the VM a name, like `name: web-1`",
            "kernel" => {
                "add `kernel: bundled` for relive's own guest, or the path of an ELF vmlinux or \
                 bzImage"
            }
            "listen" => "add `listen: 127.0.0.1:9464`, or remove `metrics:`",
            _ => "add it",
        };
        let m = format!("missing required key \"{field}\": {what}");
        (ConfigErrorKind::MissingKey, join(&field), m)
    } else if let Some(rest) = message.strip_prefix("duplicate field ") {
        let field = backticked(rest).into_iter().next().unwrap_or_default();
        let m = format!("\"{field}\" is given twice here: keep one");
        (ConfigErrorKind::DuplicateKey, join(&field), m)
    } else if let Some(rest) = message.strip_prefix("invalid type: ") {
        let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
        if path == "vms" && found == "unit value" {
            let m = "no VMs: list at least one VM under `vms:`".to_string();
            (ConfigErrorKind::NoVms, path.clone(), m)
        } else if path.is_empty() {
            let m = "the fleet file must be a mapping of keys like state_dir, defaults and vms \
                     (see configs/fleet.example.yaml)"
                .to_string();
            (ConfigErrorKind::Syntax, String::new(), m)
        } else {
            let m = format!(
                "expected {}, found {}",
                friendly_expected(expected),
                friendly_found(found)
            );
            (ConfigErrorKind::BadType, path.clone(), m)
        }
    } else if let Some(rest) = message.strip_prefix("invalid value: ") {
        let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
        let m = format!(
            "{} is out of range: expected {}",
            friendly_found(found),
            friendly_expected(expected)
        );
        (ConfigErrorKind::BadValue, path.clone(), m)
    } else if !path.is_empty() {
        // Our own messages: only durations raise them.
        (ConfigErrorKind::BadDuration, path.clone(), message)
    } else if message.contains("more than one document") {
        let m =
            "the file holds more than one YAML document (---): keep one fleet per file".to_string();
        (ConfigErrorKind::Syntax, String::new(), m)
    } else if location.is_some_and(|l| tab_indented(source, l.line)) {
        let m = format!("{message}: YAML does not allow tabs for indentation; indent with spaces");
        (ConfigErrorKind::Syntax, String::new(), m)
    } else {
        let m = format!(
            "{message}: fix the YAML syntax (indent with spaces; write `key: value`; quote \
             values that contain `: ` or start with a special character)"
        );
        (ConfigErrorKind::Syntax, String::new(), m)
    };
    // serde_yaml places a missing key at its mapping and an error of a value
    // at the value; point at the key itself where the text has it.
    let location = match kind {
        ConfigErrorKind::BadType | ConfigErrorKind::BadValue | ConfigErrorKind::BadDuration => {
            parse_key_path(&key)
                .and_then(|segs| locate_exact(source, &segs))
                .or(location)
        }
        _ => location,
    };
    ConfigError {
        file: file.to_path_buf(),
        location,
        key,
        kind,
        message,
        source: None,
    }
}

/// Whether line `line` (1-based) of `source` is indented with a tab.
pub(super) fn tab_indented(source: &str, line: usize) -> bool {
    source
        .lines()
        .nth(line.saturating_sub(1))
        .is_some_and(|l| l.trim_start_matches(' ').starts_with('\t'))
}

/// Whether `text` is a serde_yaml path like `vms[0].limits`.
pub(super) fn is_yaml_path(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']' | '-'))
}

/// The `backticked` words of a serde message, in order.
pub(super) fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The known key closest to `typo`, if it is close (an edit distance of at
/// most 2, or one contains the other).
pub(super) fn closest(typo: &str, known: &[String]) -> Option<String> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut diagonal = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let above = row[j + 1];
                row[j + 1] = (diagonal + usize::from(ca != *cb))
                    .min(row[j] + 1)
                    .min(above + 1);
                diagonal = above;
            }
        }
        row[b.len()]
    }
    known
        .iter()
        .map(|k| (distance(typo, k), k))
        .filter(|(d, k)| *d <= 2 || (typo.len() >= 4 && (k.contains(typo) || typo.contains(*k))))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.clone())
}

pub(super) fn friendly_expected(expected: &str) -> String {
    match expected {
        "u8" => "a whole number from 0 to 255".into(),
        "u32" => format!("a whole number from 0 to {}", u32::MAX),
        "u64" | "usize" => "a whole number of 0 or more".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "a list (lines starting with `- `)".into(),
        e if e.starts_with("struct ") => "a mapping (`key: value` lines)".into(),
        e => e.into(),
    }
}

pub(super) fn friendly_found(found: &str) -> String {
    match found {
        "unit value" => "an empty value".into(),
        "map" => "a mapping".into(),
        "sequence" => "a list".into(),
        f => f.replace('`', ""),
    }
}
