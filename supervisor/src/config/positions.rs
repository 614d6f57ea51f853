//! Finding a key in the source text.
//!
//! serde_yaml tells where it failed, but checks made after parsing (duplicate
//! names, missing kernels, impossible policies) need the line of a key path
//! like `vms[1].name`. The locator reads the block structure from indentation:
//! a mapping's keys share the column of its first key; a sequence's items are
//! `- ` lines at one column, each item's content starting after its `- `.
//! Inline `{ key: value }` mappings are searched for the key; inline lists
//! are not entered. When a step cannot be found, the deepest step found is
//! returned.

use super::*;

/// One line with content: where its content starts and what it is, comments
/// and trailing spaces cut off.
#[derive(Debug, Clone, Copy)]
pub(super) struct SrcLine<'a> {
    /// 1-based.
    pub(super) line: usize,
    /// 0-based, in characters.
    pub(super) col: usize,
    pub(super) text: &'a str,
}

impl SrcLine<'_> {
    fn location(&self) -> Location {
        Location {
            line: self.line,
            column: self.col + 1,
        }
    }
}

/// `line` without its comment.
pub(super) fn strip_comment(line: &str) -> &str {
    let mut quote = None::<char>;
    let mut prev = ' ';
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '#' && prev.is_whitespace() => return &line[..i],
            None if (c == '"' || c == '\'')
                && (prev.is_whitespace() || matches!(prev, ':' | '[' | '{' | ',' | '-')) =>
            {
                quote = Some(c)
            }
            None => {}
        }
        prev = c;
    }
    line
}

pub(super) fn content_lines(source: &str) -> Vec<SrcLine<'_>> {
    source
        .lines()
        .enumerate()
        .filter_map(|(i, raw)| {
            let cut = strip_comment(raw).trim_end();
            let text = cut.trim_start_matches(' ');
            let skip = text.is_empty()
                || text == "---"
                || text == "..."
                || (text.starts_with('%') && cut.len() == text.len());
            (!skip).then(|| SrcLine {
                line: i + 1,
                col: cut.len() - text.len(),
                text,
            })
        })
        .collect()
}

pub(super) fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

/// What follows `key:` at the start of `text`, if `text` starts with that key.
pub(super) fn after_key<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let unquoted = text.strip_prefix(key);
    let quoted = || {
        let q = text.chars().next().filter(|c| *c == '"' || *c == '\'')?;
        text[1..].strip_prefix(key)?.strip_prefix(q)
    };
    let rest = unquoted.or_else(quoted)?.trim_start_matches(' ');
    let rest = rest.strip_prefix(':')?;
    (rest.is_empty() || rest.starts_with(' ')).then_some(rest)
}

/// The region holding `rest`, which starts in `line` after `offset` bytes.
pub(super) fn inline<'a>(line: &SrcLine<'a>, offset: usize) -> SrcLine<'a> {
    SrcLine {
        line: line.line,
        col: line.col + line.text[..offset].chars().count(),
        text: &line.text[offset..],
    }
}

pub(super) fn find_key<'a>(
    region: &[SrcLine<'a>],
    key: &str,
) -> Option<(Location, Vec<SrcLine<'a>>)> {
    let first = region.first()?;
    if first.text.starts_with('{') {
        return find_flow_key(first, key);
    }
    let indent = first.col;
    for (i, l) in region.iter().enumerate() {
        if l.col != indent || is_item(l.text) {
            continue;
        }
        let Some(rest) = after_key(l.text, key) else {
            continue;
        };
        let value = rest.trim_start();
        let child = if value.is_empty() {
            region[i + 1..]
                .iter()
                .take_while(|n| n.col > indent || (n.col == indent && is_item(n.text)))
                .copied()
                .collect()
        } else {
            vec![inline(l, l.text.len() - value.len())]
        };
        return Some((l.location(), child));
    }
    None
}

/// Finds `key` inside an inline `{ ... }` mapping.
pub(super) fn find_flow_key<'a>(
    line: &SrcLine<'a>,
    key: &str,
) -> Option<(Location, Vec<SrcLine<'a>>)> {
    let text = line.text;
    let mut from = 0;
    while let Some(found) = text[from..].find(key) {
        let start = from + found;
        let before = text[..start].chars().next_back();
        let boundary = matches!(before, Some('{' | ',' | ' '));
        if boundary {
            if let Some(rest) = after_key(&text[start..], key) {
                let value = rest.trim_start();
                let at = inline(line, start);
                let child = inline(line, text.len() - value.len());
                return Some((at.location(), vec![child]));
            }
        }
        from = start + key.len();
    }
    None
}

pub(super) fn find_index<'a>(
    region: &[SrcLine<'a>],
    index: usize,
) -> Option<(Location, Vec<SrcLine<'a>>)> {
    let first = region.first()?;
    let indent = first.col;
    let (i, item) = region
        .iter()
        .enumerate()
        .filter(|(_, l)| l.col == indent && is_item(l.text))
        .nth(index)?;
    let value = item.text[1..].trim_start();
    let mut child = Vec::new();
    if !value.is_empty() {
        child.push(inline(item, item.text.len() - value.len()));
    }
    child.extend(
        region[i + 1..]
            .iter()
            .take_while(|n| n.col > indent)
            .copied(),
    );
    let at = child.first().map_or(item.location(), SrcLine::location);
    Some((at, child))
}

/// Where the key `path` is written in `source`, or its deepest ancestor found.
pub(super) fn locate(source: &str, path: &[Seg]) -> Option<Location> {
    walk(source, path).0
}

/// Where the key `path` is written in `source`, only if found itself.
pub(super) fn locate_exact(source: &str, path: &[Seg]) -> Option<Location> {
    match walk(source, path) {
        (found, true) => found,
        (_, false) => None,
    }
}

/// The deepest step of `path` found, and whether that is all of it.
pub(super) fn walk(source: &str, path: &[Seg]) -> (Option<Location>, bool) {
    let mut region = content_lines(source);
    let mut found = None;
    for seg in path {
        let step = match seg {
            Seg::Key(k) => find_key(&region, k),
            Seg::Index(i) => find_index(&region, *i),
        };
        let Some((at, child)) = step else {
            return (found, false);
        };
        found = Some(at);
        region = child;
    }
    (found, true)
}
