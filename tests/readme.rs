//! The README tells the truth, checked against a running server:
//!
//! * `## A first session` is what `redis-cli` prints for each of its commands (replies rendered
//!   as redis-cli renders them; a `...` line stands for any run of lines, `<now>` and
//!   `<now + N>` for a Unix time within a minute of the test's clock, or N seconds after it);
//! * the command table under `## Commands` lists every `QUOTA.*` command and `QUOTA.POLICY`
//!   subcommand that `COMMAND DOCS` knows (the internal ones aside) and nothing else, each with
//!   the arguments COMMAND DOCS gives: the required ones by name and order, every option's
//!   keyword, and the arity;
//! * the `quota_*` fields that `## Operations` names are the fields of `INFO quota`, and every
//!   field of `INFO quota` is in its table; no `INFO` field is named without its prefix;
//! * the options of `## Configuration` are the module's configs (`CONFIG GET quota.*`), with the
//!   defaults a server loaded without arguments shows.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;

fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).expect("README.md")
}

/// The text of the section that starts with the heading line `heading` (e.g. `## Commands`),
/// up to the next heading of the same or a higher level.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let level = heading.split(' ').next().unwrap_or("##").len();
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("the README has no {heading:?} section"))
        + heading.len()
        + 2;
    let rest = &text[start..];
    let mut end = rest.len();
    let mut offset = 0;
    let mut fenced = false;
    for line in rest.split_inclusive('\n') {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !fenced && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            end = offset;
            break;
        }
        offset += line.len();
    }
    &rest[..end]
}

// ---------------------------------------------------------------------------
// redis-cli's rendering (cliFormatReplyTTY of redis-cli 7 and 8)
// ---------------------------------------------------------------------------

/// A string as redis-cli quotes it (`sdscatrepr`).
fn repr(bytes: &[u8]) -> String {
    let mut out = String::from("\"");
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            7 => out.push_str("\\a"),
            8 => out.push_str("\\b"),
            b if b.is_ascii_graphic() || b == b' ' => out.push(char::from(b)),
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push('"');
    out
}

/// Appends `v` as redis-cli prints it; `prefix` indents the lines of nested arrays.
fn render_into(out: &mut String, v: &Value, prefix: &str) {
    let items: Vec<&Value> = match v {
        Value::Array(items) | Value::Set(items) => items.iter().collect(),
        Value::Map(pairs) => pairs.iter().flat_map(|(k, v)| [k, v]).collect(),
        Value::Nil => {
            out.push_str("(nil)\n");
            return;
        }
        Value::Int(i) => {
            out.push_str(&format!("(integer) {i}\n"));
            return;
        }
        Value::BulkString(b) => {
            out.push_str(&repr(b));
            out.push('\n');
            return;
        }
        Value::SimpleString(s) => {
            out.push_str(s);
            out.push('\n');
            return;
        }
        Value::Okay => {
            out.push_str("OK\n");
            return;
        }
        other => panic!("no redis-cli rendering for {other:?} in the first session"),
    };
    if items.is_empty() {
        out.push_str("(empty array)\n");
        return;
    }
    let width = items.len().to_string().len();
    let nested = format!("{prefix}{}", " ".repeat(width + 2));
    for (i, item) in items.iter().enumerate() {
        let indent = if i == 0 { "" } else { prefix };
        out.push_str(&format!("{indent}{:>width$}) ", i + 1));
        render_into(out, item, &nested);
    }
}

/// A reply (or error) as the lines redis-cli prints for it.
fn render(reply: &redis::RedisResult<Value>) -> Vec<String> {
    let mut out = String::new();
    match reply {
        Ok(v) => render_into(&mut out, v, ""),
        Err(e) => out.push_str(&format!("(error) {}\n", error_text(e))),
    }
    out.lines().map(str::to_string).collect()
}

#[test]
fn the_rendering_is_redis_clis() {
    let nested = Value::Array(vec![
        Value::Array(vec![Value::BulkString(b"a\"b".to_vec()), Value::Int(2)]),
        Value::Nil,
        Value::Array(vec![]),
        Value::SimpleString("OK".into()),
    ]);
    assert_eq!(
        render(&Ok(nested)),
        [
            r#"1) 1) "a\"b""#,
            "   2) (integer) 2",
            "2) (nil)",
            "3) (empty array)",
            "4) OK",
        ]
    );
    let ten = Value::Array((1..=10).map(Value::Int).collect());
    let lines = render(&Ok(ten));
    assert_eq!(lines[0], " 1) (integer) 1");
    assert_eq!(lines[9], "10) (integer) 10");
}

// ---------------------------------------------------------------------------
// A first session
// ---------------------------------------------------------------------------

/// redis-cli's splitting of a command line (`sdssplitargs`): words, `"..."` with backslash
/// escapes, `'...'`.
fn split_args(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return out;
        };
        let mut word = String::new();
        if first == '"' || first == '\'' {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    c if c == first => break,
                    '\\' if first == '"' => word.extend(chars.next()),
                    c => word.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                word.push(c);
            }
        }
        out.push(word);
    }
}

/// One command of the session and the lines the README shows for it.
struct Step {
    command: Vec<String>,
    expected: Vec<String>,
}

const PROMPT: &str = "127.0.0.1:6379> ";

/// The `console` block of `## A first session`.
fn first_session(readme: &str) -> Vec<Step> {
    let text = section(readme, "## A first session");
    let block = text
        .split("```console\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a ```console block in ## A first session");
    let mut steps: Vec<Step> = Vec::new();
    for line in block.lines() {
        if let Some(command) = line.strip_prefix(PROMPT) {
            steps.push(Step {
                command: split_args(command),
                expected: Vec::new(),
            });
        } else if let Some(step) = steps.last_mut() {
            step.expected.push(line.trim_end().to_string());
        } else {
            assert!(
                line.starts_with("$ redis-cli"),
                "before the first command: {line:?}"
            );
        }
    }
    steps
}

/// Whether a README line (with its `<now>` / `<now + N>` placeholders) shows `actual`.
fn line_matches(expected: &str, actual: &str, now: i64) -> bool {
    if expected == actual {
        return true;
    }
    let Some(open) = expected.find('<') else {
        return false;
    };
    let Some(close) = expected[open..].find('>').map(|c| open + c) else {
        return false;
    };
    let (head, tail) = (&expected[..open], &expected[close + 1..]);
    let placeholder = &expected[open + 1..close];
    let at = match placeholder.split_once(" + ") {
        None if placeholder == "now" => now,
        Some(("now", offset)) => match offset.parse::<i64>() {
            Ok(offset) => now + offset,
            Err(_) => return false,
        },
        _ => return false,
    };
    let Some(value) = actual
        .strip_prefix(head)
        .and_then(|rest| rest.strip_suffix(tail))
        .and_then(|v| v.parse::<i64>().ok())
    else {
        return false;
    };
    (value - at).abs() <= 60
}

fn is_elision(line: &str) -> bool {
    line.trim_start().starts_with("...")
}

/// Whether `expected` shows `actual`: line by line, a `...` line standing for any run of
/// lines (none included).
fn lines_match(expected: &[String], actual: &[String], now: i64) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if is_elision(first) => {
            (0..=actual.len()).any(|skip| lines_match(rest, &actual[skip..], now))
        }
        Some((first, rest)) => match actual.split_first() {
            Some((line, more)) => line_matches(first, line, now) && lines_match(rest, more, now),
            None => false,
        },
    }
}

#[test]
fn line_matching_allows_elisions_and_times() {
    let lines = |s: &[&str]| s.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    let now = 1_800_000_000;
    let actual = lines(&["1) a", "2) (integer) 1800000005", "3) b", "4) c"]);
    assert!(lines_match(
        &lines(&["1) a", "2) (integer) <now>", "..."]),
        &actual,
        now
    ));
    assert!(lines_match(&lines(&["...", "4) c"]), &actual, now));
    assert!(lines_match(
        &lines(&["1) a", " ...", "3) b", "...", "4) c"]),
        &actual,
        now
    ));
    assert!(!lines_match(&lines(&["1) a", "...", "3) c"]), &actual, now));
    assert!(!lines_match(
        &lines(&["1) a", "2) (integer) <now + 3600>", "..."]),
        &actual,
        now
    ));
    assert!(!lines_match(
        &lines(&["1) a", "2) (integer) 1800000006", "..."]),
        &actual,
        now
    ));
    assert!(!lines_match(&lines(&["1) a"]), &actual, now));
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[test]
fn the_first_session_is_what_redis_cli_prints() {
    let readme = readme();
    let steps = first_session(&readme);
    assert!(
        steps.len() >= 3,
        "the first session has {} commands",
        steps.len()
    );
    let (_schema, server, mut con) = test_server_con();
    server.wait_notify_state("listening", std::time::Duration::from_secs(10));
    for step in &steps {
        let args: Vec<&str> = step.command.iter().map(String::as_str).collect();
        let now = unix_now();
        let actual = render(&query(&mut con, &args));
        assert!(
            lines_match(&step.expected, &actual, now),
            "the README's first session shows for {}:\n{}\nredis-cli prints:\n{}",
            step.command.join(" "),
            step.expected.join("\n"),
            actual.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------
// The command table
// ---------------------------------------------------------------------------

/// A RESP2 flat field/value array as a map.
fn doc_map(v: Value) -> BTreeMap<String, Value> {
    to_array(v)
        .chunks(2)
        .filter_map(|kv| match kv {
            [k, v] => Some((value_to_string(k)?, v.clone())),
            _ => None,
        })
        .collect()
}

/// One argument as COMMAND DOCS describes it.
#[derive(Debug)]
struct DocArg {
    name: String,
    token: Option<String>,
    optional: bool,
    /// A `oneof`'s choices.
    choices: Vec<DocArg>,
}

fn doc_args(v: Option<&Value>) -> Vec<DocArg> {
    v.cloned()
        .map(to_array)
        .unwrap_or_default()
        .into_iter()
        .map(|a| {
            let m = doc_map(a);
            let text = |f: &str| m.get(f).and_then(value_to_string);
            let flags: Vec<String> = m
                .get("flags")
                .cloned()
                .map(to_array)
                .unwrap_or_default()
                .iter()
                .filter_map(value_to_string)
                .collect();
            DocArg {
                name: text("name").unwrap_or_default(),
                token: text("token"),
                optional: flags.iter().any(|f| f == "optional"),
                choices: doc_args(m.get("arguments")),
            }
        })
        .collect()
}

/// A command as COMMAND DOCS and COMMAND INFO describe it.
struct DocCommand {
    arity: i64,
    args: Vec<DocArg>,
    internal: bool,
}

/// Every `QUOTA.*` command and `QUOTA.POLICY` subcommand, by the name the README writes
/// (`QUOTA.GET`, `QUOTA.POLICY SET`).
fn documented_commands(con: &mut redis::Connection) -> BTreeMap<String, DocCommand> {
    let docs = doc_map(query(con, &["COMMAND", "DOCS"]).expect("COMMAND DOCS"));
    let mut out = BTreeMap::new();
    for (name, doc) in docs {
        let doc = doc_map(doc);
        if doc.get("module").and_then(value_to_string).as_deref() != Some("quota") {
            continue;
        }
        let mut entries = vec![(name, doc.clone())];
        if let Some(subs) = doc.get("subcommands") {
            entries = doc_map(subs.clone())
                .into_iter()
                .map(|(n, d)| (n, doc_map(d)))
                .collect();
        }
        for (name, doc) in entries {
            let info = to_array(query(con, &["COMMAND", "INFO", &name]).expect("COMMAND INFO"));
            let info = to_array(info.into_iter().next().expect("a COMMAND INFO entry"));
            let arity = value_i64(&info[1]).expect("an arity");
            let summary = doc
                .get("summary")
                .and_then(value_to_string)
                .unwrap_or_default();
            out.insert(
                name.replace('|', " ").to_uppercase(),
                DocCommand {
                    arity,
                    args: doc_args(doc.get("arguments")),
                    internal: summary.starts_with("Internal"),
                },
            );
        }
    }
    out
}

/// The rows of the first table in `text` whose header line starts with `header`.
fn table<'a>(text: &'a str, header: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| !l.starts_with(header))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect()
}

/// The syntax cell of each row of the `## Commands` table, `\|` read as `|`.
fn readme_commands(readme: &str) -> Vec<String> {
    let text = section(readme, "## Commands");
    table(text, "| command | does |")
        .into_iter()
        .map(|l| {
            let l = l.replace("\\|", "|");
            l.trim_start_matches("| `")
                .split('`')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// What a syntax shows: the required words after the command's name (placeholders `<x>`,
/// keywords, `A|B` choices) and the keywords of its optional parts.
#[derive(Debug, Default)]
struct Syntax {
    required: Vec<String>,
    optional_tokens: BTreeSet<String>,
    has_optional: bool,
}

/// The ten limits, which the table writes once for GRANT and then as `limits as in GRANT`.
const LIMITS: [&str; 10] = [
    "REQUESTS_PER_DAY",
    "REQUESTS_PER_MONTH",
    "TOTAL_REQUESTS",
    "TOKENS_PER_HOUR",
    "TOKENS_PER_DAY",
    "TOKENS_PER_MONTH",
    "MAX_CONCURRENT",
    "REQUESTS_PER_SECOND",
    "REQUESTS_PER_MINUTE",
    "TOKENS_PER_MINUTE",
];

fn is_keyword(word: &str) -> bool {
    word.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && word
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_' || c == '|')
}

fn parse_syntax(words: &[&str]) -> Syntax {
    let mut s = Syntax::default();
    let mut depth = 0usize;
    let text = words.join(" ");
    if text.contains("[limits as in GRANT]") {
        s.optional_tokens
            .extend(LIMITS.iter().map(|l| l.to_string()));
        s.has_optional = true;
    }
    let text = text.replace("[limits as in GRANT]", "");
    for word in text.split_whitespace() {
        let opens = word.chars().filter(|c| *c == '[').count();
        let closes = word.chars().filter(|c| *c == ']').count();
        let bare = word.trim_matches(['[', ']']);
        depth += opens;
        if depth > 0 {
            s.has_optional = true;
            for part in bare.split('|').filter(|p| is_keyword(p)) {
                s.optional_tokens.insert(part.to_string());
            }
        } else if !bare.is_empty() {
            s.required.push(bare.to_string());
        }
        depth = depth.saturating_sub(closes);
    }
    s
}

/// What COMMAND DOCS says the same syntax must show.
fn expected_syntax(args: &[DocArg]) -> Syntax {
    let mut s = Syntax::default();
    for a in args {
        if a.optional {
            s.has_optional = true;
            let tokens = a
                .token
                .iter()
                .chain(a.choices.iter().filter_map(|c| c.token.as_ref()));
            s.optional_tokens.extend(tokens.cloned());
            continue;
        }
        match (&a.token, a.choices.is_empty()) {
            (_, false) => {
                let choices: Vec<&str> = a
                    .choices
                    .iter()
                    .filter_map(|c| c.token.as_deref())
                    .collect();
                s.required.push(choices.join("|"));
            }
            (Some(token), true) => {
                s.required.push(token.clone());
                s.required.push(format!("<{}>", a.name));
            }
            (None, true) => s.required.push(format!("<{}>", a.name)),
        }
    }
    s
}

/// Whether the README's required word shows COMMAND DOCS's: the same keyword, or for a
/// placeholder the argument's name or its initial (`<t>` for `<tenant>`); a placeholder after
/// a keyword may say what it holds instead (`FROM unix-s`).
fn word_matches(readme: &str, doc: &str, after_keyword: bool) -> bool {
    let Some(name) = doc.strip_prefix('<').and_then(|d| d.strip_suffix('>')) else {
        return readme == doc;
    };
    match readme.strip_prefix('<').and_then(|r| r.strip_suffix('>')) {
        Some(shown) => shown == name || name.starts_with(shown) && shown.len() == 1,
        None => after_keyword && !is_keyword(readme),
    }
}

#[test]
fn the_command_table_matches_command_docs() {
    let readme = readme();
    let rows = readme_commands(&readme);
    let schema = unique_schema();
    let server = RedisServer::builder()
        .module_args(&[("schema", schema.as_str())])
        .start();
    let mut con = server.client();
    let commands = documented_commands(&mut con);
    let mut problems = Vec::new();
    let mut listed = BTreeSet::new();
    for row in &rows {
        let words: Vec<&str> = row.split_whitespace().collect();
        let name_words = if words[0] == "QUOTA.POLICY" { 2 } else { 1 };
        let name = words[..name_words].join(" ").to_uppercase();
        let Some(doc) = commands.get(&name) else {
            problems.push(format!("{name}: in the README, not registered"));
            continue;
        };
        listed.insert(name.clone());
        let shown = parse_syntax(&words[name_words..]);
        let wanted = expected_syntax(&doc.args);
        let same_required = shown.required.len() == wanted.required.len()
            && shown
                .required
                .iter()
                .zip(&wanted.required)
                .enumerate()
                .all(|(i, (r, d))| {
                    let after_keyword = i > 0 && is_keyword(&wanted.required[i - 1]);
                    word_matches(r, d, after_keyword)
                });
        if !same_required {
            problems.push(format!(
                "{name}: required arguments {:?}, COMMAND DOCS has {:?}",
                shown.required, wanted.required
            ));
        }
        if shown.optional_tokens != wanted.optional_tokens {
            problems.push(format!(
                "{name}: options {:?}, COMMAND DOCS has {:?}",
                shown.optional_tokens, wanted.optional_tokens
            ));
        }
        let words_needed = (name_words + shown.required.len()) as i64;
        let arity = if shown.has_optional {
            -words_needed
        } else {
            words_needed
        };
        if arity != doc.arity {
            problems.push(format!(
                "{name}: arity {arity} by the README, {}",
                doc.arity
            ));
        }
    }
    for (name, doc) in &commands {
        if !doc.internal && !listed.contains(name) {
            problems.push(format!("{name}: registered, not in the README's table"));
        }
    }
    assert!(
        problems.is_empty(),
        "the README's command table:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------
// INFO fields and configs
// ---------------------------------------------------------------------------

/// The backquoted words of `text` (a code span of one word).
fn code_words(text: &str) -> Vec<&str> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.contains(char::is_whitespace))
        .collect()
}

/// The tables of the schema (`sql/deploy-control-plane.sql`).
fn schema_tables() -> BTreeSet<String> {
    let sql = std::fs::read_to_string(repo_root().join("sql/deploy-control-plane.sql"))
        .expect("sql/deploy-control-plane.sql");
    sql.lines()
        .filter_map(|l| l.strip_prefix("CREATE TABLE IF NOT EXISTS "))
        .filter_map(|l| l.split('.').nth(1))
        .map(|t| t.trim_end_matches(['(', ' ']).to_string())
        .collect()
}

#[test]
fn every_info_field_is_documented_with_its_prefix() {
    let readme = readme();
    let schema = unique_schema();
    let server = test_server(&schema);
    let fields: BTreeSet<String> = server.info("quota").into_keys().collect();
    assert!(fields.len() > 20, "INFO quota: {fields:?}");
    let operations = section(&readme, "## Operations");
    let documented: BTreeSet<String> = table(section(operations, "### INFO quota"), "| field |")
        .into_iter()
        .flat_map(|row| code_words(row.split(" | ").next().unwrap_or_default()))
        .map(str::to_string)
        .collect();
    let mut problems = Vec::new();
    for field in fields.difference(&documented) {
        problems.push(format!("{field}: in INFO quota, not in the README's table"));
    }
    for field in documented.difference(&fields) {
        problems.push(format!("{field}: in the README's table, not in INFO quota"));
    }
    // Anything named `quota_...` is a field of INFO or a table of the schema.
    let tables = schema_tables();
    for word in code_words(&readme) {
        let name = word.split(':').next().unwrap_or(word);
        let is_name = name.len() > "quota_".len()
            && name.starts_with("quota_")
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if is_name && !fields.contains(name) && !tables.contains(name) {
            problems.push(format!("`{word}`: named in the README, not in INFO quota"));
        }
    }
    // A field is named with its prefix, as INFO prints it.
    for word in code_words(&readme) {
        if fields.contains(&format!("quota_{word}")) {
            problems.push(format!("`{word}`: an INFO field named without `quota_`"));
        }
    }
    assert!(
        problems.is_empty(),
        "INFO quota and the README:\n{}",
        problems.join("\n")
    );
}

/// The value a config's README default stands for (`""` is the empty string).
fn readme_default(cell: &str) -> String {
    let value = cell.trim().trim_matches('`');
    if value == "\"\"" {
        String::new()
    } else {
        value.to_string()
    }
}

#[test]
fn the_configuration_table_is_the_modules_configs() {
    let readme = readme();
    let rows: BTreeMap<String, String> = table(section(&readme, "## Configuration"), "| option |")
        .into_iter()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            let name = cells
                .first()?
                .trim_start_matches("| `")
                .trim_end_matches('`');
            Some((name.to_string(), readme_default(cells.get(1)?)))
        })
        .collect();
    // Loaded without arguments: every config at its default.
    let server = RedisServer::builder().start();
    let mut con = server.client();
    let got = to_array(query(&mut con, &["CONFIG", "GET", "quota.*"]).expect("CONFIG GET"));
    let configs: BTreeMap<String, String> = got
        .chunks(2)
        .filter_map(|kv| {
            let name = value_to_string(&kv[0])?;
            Some((
                name.strip_prefix("quota.")?.to_string(),
                value_to_string(&kv[1])?,
            ))
        })
        .collect();
    assert!(configs.len() > 10, "CONFIG GET quota.*: {configs:?}");
    let mut problems = Vec::new();
    for (name, value) in &configs {
        match rows.get(name) {
            None => problems.push(format!("quota.{name}: a config, not in the README's table")),
            Some(default) if default != value => problems.push(format!(
                "quota.{name}: default {default:?} in the README, {value:?} on the server"
            )),
            Some(_) => {}
        }
    }
    for name in rows.keys().filter(|n| !configs.contains_key(*n)) {
        problems.push(format!("{name}: in the README's table, not a config"));
    }
    assert!(
        problems.is_empty(),
        "the README's configuration table:\n{}",
        problems.join("\n")
    );
}
