//! What libyaml refuses that granit-parser accepts.
//!
//! go-yaml v2, which kubectl decodes YAML with, is a port of libyaml, whose scanner is
//! stricter than YAML 1.2 in two places: tabs, and two escapes. A file kubectl refuses
//! must not go through the agent, so these checks refuse the same (YAML documents only:
//! kubectl reads JSON with Go's JSON decoder).

use std::ops::Range;

use super::decode::DecodeError;

/// The escapes of a double-quoted scalar's source (quotes included): YAML 1.2's `\/`,
/// and `\u`/`\U` escapes of UTF-16 surrogates, which libyaml refuses.
pub(super) fn check_escapes(source: &str) -> Result<(), DecodeError> {
    let mut rest = source;
    while let Some(at) = rest.find('\\') {
        let escape = &rest[at..];
        let length = match escape[1..].chars().next() {
            Some('/') => return Err(DecodeError::Escape(escape[..2].to_owned())),
            Some('u') => 6,
            Some('U') => 10,
            Some(c) => 1 + c.len_utf8(),
            None => 1,
        };
        let code = escape.get(2..length).and_then(|digits| u32::from_str_radix(digits, 16).ok());
        if code.is_some_and(|code| (0xD800..=0xDFFF).contains(&code)) {
            return Err(DecodeError::Escape(escape[..length].to_owned()));
        }
        rest = escape.get(length..).unwrap_or_default();
    }
    Ok(())
}

/// libyaml takes a tab for whitespace only inside lines of block structure, never in
/// the indentation of a line (blank lines included) nor right after a `-`, `?` or `:`
/// indicator that starts one; YAML 1.2 is laxer. The lines continuing a scalar or a flow
/// collection (`inside`, byte ranges of `text`) have rules of their own, which granit
/// applies as libyaml does. Returns the 0-based index of the first line breaking this.
pub(super) fn check_tabs(text: &str, inside: &[Range<usize>]) -> Result<(), usize> {
    let mut inside = inside.to_vec();
    inside.sort_by_key(|range| range.start);
    let mut started = inside.iter().peekable();
    // The furthest end of the ranges that start before the current line.
    let mut reach = 0;
    let mut line_start = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        while let Some(range) = started.next_if(|range| range.start < line_start) {
            reach = reach.max(range.end);
        }
        if line_start >= reach && has_indenting_tab(line) {
            return Err(index);
        }
        line_start += line.len();
    }
    Ok(())
}

fn has_indenting_tab(line: &str) -> bool {
    let mut rest = line.trim_start_matches(' ');
    loop {
        if rest.starts_with('\t') {
            return true;
        }
        // An indicator followed by whitespace starts a node; the whitespace is indentation.
        match rest.strip_prefix(['-', '?', ':']) {
            Some(after) if after.starts_with([' ', '\t']) => rest = after.trim_start_matches(' '),
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_libyaml_does_not_know() {
        assert_eq!(
            check_escapes(r#""a\/b""#).unwrap_err().to_string(),
            "kubectl refuses the escape `\\/`: write the character itself"
        );
        assert!(check_escapes(r#""\ud83d\ude00""#).is_err());
        assert!(check_escapes(r#""\\/ \u00e9 \U0001F600 \x41""#).is_ok());
    }

    #[test]
    fn tabs_in_indentation() {
        let ok = "a: 1\t# comment\nb:\t2\nc: - x\n- &x\ty\n";
        assert_eq!(check_tabs(ok, &[]), Ok(()));
        for bad in ["a:\n\tb: 1\n", "a: 1\n\t\nb: 2\n", "- \ta\n", "- - \ta\n", "? a\n:\tb\n", "x:\n  \t# comment\n"] {
            assert!(check_tabs(bad, &[]).is_err(), "{bad:?}");
        }
        let quoted = "a: \"x\n\ty\"\n";
        assert_eq!(check_tabs(quoted, std::slice::from_ref(&(3..10))), Ok(()), "the continuation of a quoted scalar");
        assert_eq!(check_tabs(quoted, &[]), Err(1));
    }
}
