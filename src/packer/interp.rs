//! Go-template interpolation of JSON-template builder options.
//!
//! Packer 1.6.6 hands a JSON template's builder options to the plugin
//! *uninterpolated*; the Go SDK renders them itself. This is the subset users
//! write in builder options: `user`, `env` (refused, as Packer refuses it
//! outside variable defaults), `build_name`, `build_type`, `timestamp`,
//! `isotime`, `uuid`, `pwd`, `template_dir`, `packer_version`, `upper`,
//! `lower`, `replace`, `replace_all`, `split`, with pipelines and parentheses.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// What the functions can see.
#[derive(Debug, Clone, Default)]
pub struct InterpContext {
    pub user_variables: BTreeMap<String, String>,
    pub build_name: String,
    pub build_type: String,
    pub template_path: String,
    pub core_version: String,
    /// Unix time the build started (`timestamp`, `isotime`).
    pub init_time: u64,
    /// `env` is only allowed where Packer allows it (variable defaults).
    pub enable_env: bool,
}

impl InterpContext {
    pub fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(i64),
    Pipe,
    Open,
    Close,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let c: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '|' {
            out.push(Tok::Pipe);
            i += 1;
        } else if ch == '(' {
            out.push(Tok::Open);
            i += 1;
        } else if ch == ')' {
            out.push(Tok::Close);
            i += 1;
        } else if ch == '`' {
            let end = c[i + 1..]
                .iter()
                .position(|x| *x == '`')
                .ok_or("unterminated raw quoted string")?;
            out.push(Tok::Str(c[i + 1..i + 1 + end].iter().collect()));
            i += end + 2;
        } else if ch == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                match c.get(i) {
                    None => return Err("unterminated quoted string".into()),
                    Some('"') => break,
                    Some('\\') => {
                        let e = c.get(i + 1).ok_or("unterminated quoted string")?;
                        s.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            other => *other,
                        });
                        i += 2;
                    }
                    Some(x) => {
                        s.push(*x);
                        i += 1;
                    }
                }
            }
            i += 1;
            out.push(Tok::Str(s));
        } else if ch.is_ascii_digit()
            || (ch == '-' && c.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let start = i;
            i += 1;
            while i < c.len() && c[i].is_ascii_digit() {
                i += 1;
            }
            let t: String = c[start..i].iter().collect();
            out.push(Tok::Num(t.parse().map_err(|_| format!("bad number {t}"))?));
        } else if ch.is_alphanumeric() || ch == '_' || ch == '.' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_' || c[i] == '.') {
                i += 1;
            }
            out.push(Tok::Ident(c[start..i].iter().collect()));
        } else {
            return Err(format!("unexpected {ch:?} in action"));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone)]
enum Arg {
    Lit(String),
    Num(i64),
    Call(Vec<Arg>),
    Func(String),
}

/// Parses a pipeline into a list of commands (each a list of args).
fn parse_pipeline(toks: &[Tok], pos: &mut usize, nested: bool) -> Result<Vec<Vec<Arg>>, String> {
    let mut cmds = vec![Vec::new()];
    while *pos < toks.len() {
        let t = toks[*pos].clone();
        *pos += 1;
        match t {
            Tok::Pipe => cmds.push(Vec::new()),
            Tok::Close if nested => return Ok(cmds),
            Tok::Close => return Err("unexpected )".into()),
            Tok::Open => {
                let inner = parse_pipeline(toks, pos, true)?;
                cmds.last_mut().unwrap().push(Arg::Call(flatten(inner)));
            }
            Tok::Str(s) => cmds.last_mut().unwrap().push(Arg::Lit(s)),
            Tok::Num(n) => cmds.last_mut().unwrap().push(Arg::Num(n)),
            Tok::Ident(id) => cmds.last_mut().unwrap().push(Arg::Func(id)),
        }
    }
    if nested {
        return Err("unclosed (".into());
    }
    Ok(cmds)
}

/// A nested pipeline becomes one call whose stages are chained: represent it
/// as `Call([Func("|"), Call(stage1), Call(stage2)…])` when there are pipes.
fn flatten(cmds: Vec<Vec<Arg>>) -> Vec<Arg> {
    if cmds.len() == 1 {
        return cmds.into_iter().next().unwrap();
    }
    let mut v = vec![Arg::Func("|".into())];
    v.extend(cmds.into_iter().map(Arg::Call));
    v
}

fn eval_arg(a: &Arg, ctx: &InterpContext) -> Result<String, String> {
    match a {
        Arg::Lit(s) => Ok(s.clone()),
        Arg::Num(n) => Ok(n.to_string()),
        Arg::Call(c) => eval_cmd(c, None, ctx),
        Arg::Func(f) => call(f, &[], ctx),
    }
}

fn eval_cmd(cmd: &[Arg], piped: Option<String>, ctx: &InterpContext) -> Result<String, String> {
    let Some(first) = cmd.first() else {
        return piped.ok_or_else(|| "empty command".to_string());
    };
    if let Arg::Func(f) = first {
        if f == "|" {
            let mut cur = piped;
            for stage in &cmd[1..] {
                let Arg::Call(c) = stage else { unreachable!() };
                cur = Some(eval_cmd(c, cur, ctx)?);
            }
            return cur.ok_or_else(|| "empty pipeline".into());
        }
        let mut args = cmd[1..]
            .iter()
            .map(|a| eval_arg(a, ctx))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(p) = piped {
            args.push(p);
        }
        return call(f, &args, ctx);
    }
    if cmd.len() == 1 && piped.is_none() {
        return eval_arg(first, ctx);
    }
    Err("can't give argument to non-function".into())
}

fn arity(name: &str, args: &[String], n: usize) -> Result<(), String> {
    if args.len() != n {
        return Err(format!(
            "wrong number of args for {name}: want {n} got {}",
            args.len()
        ));
    }
    Ok(())
}

fn call(name: &str, args: &[String], ctx: &InterpContext) -> Result<String, String> {
    match name {
        "user" => {
            arity(name, args, 1)?;
            Ok(ctx
                .user_variables
                .get(&args[0])
                .cloned()
                .unwrap_or_default())
        }
        "env" => {
            arity(name, args, 1)?;
            if !ctx.enable_env {
                return Err(
                    "env vars are not allowed here: use `env` in a variable's default \
                            value and `{{user}}` here"
                        .into(),
                );
            }
            Ok(std::env::var(&args[0]).unwrap_or_default())
        }
        "build_name" => {
            arity(name, args, 0)?;
            Ok(ctx.build_name.clone())
        }
        "build_type" => {
            arity(name, args, 0)?;
            Ok(ctx.build_type.clone())
        }
        "packer_version" => {
            arity(name, args, 0)?;
            Ok(ctx.core_version.clone())
        }
        "timestamp" => {
            arity(name, args, 0)?;
            Ok(ctx.init_time.to_string())
        }
        "isotime" => {
            if args.len() > 1 {
                return arity(name, args, 1).map(|_| String::new());
            }
            let layout = args
                .first()
                .map(|s| s.as_str())
                .unwrap_or("2006-01-02T15:04:05Z07:00");
            Ok(go_time_format(ctx.init_time, layout))
        }
        "uuid" => {
            arity(name, args, 0)?;
            Ok(uuid_v4())
        }
        "pwd" => {
            arity(name, args, 0)?;
            std::env::current_dir()
                .map(|p| p.display().to_string())
                .map_err(|e| format!("pwd: {e}"))
        }
        "template_dir" => {
            arity(name, args, 0)?;
            if ctx.template_path.is_empty() {
                return Err("template path not available".into());
            }
            let p = std::path::Path::new(&ctx.template_path);
            Ok(p.parent()
                .map(|d| d.display().to_string())
                .unwrap_or_default())
        }
        "upper" => {
            arity(name, args, 1)?;
            Ok(args[0].to_uppercase())
        }
        "lower" => {
            arity(name, args, 1)?;
            Ok(args[0].to_lowercase())
        }
        "replace" => {
            // replace OLD NEW N SRC (strings.Replace; N < 0 means all)
            arity(name, args, 4)?;
            let n: i64 = args[2]
                .parse()
                .map_err(|_| format!("replace: count {:?} is not a number", args[2]))?;
            Ok(if n < 0 {
                args[3].replace(&args[0], &args[1])
            } else {
                args[3].replacen(&args[0], &args[1], n as usize)
            })
        }
        "replace_all" => {
            arity(name, args, 3)?;
            Ok(args[2].replace(&args[0], &args[1]))
        }
        "split" => {
            // split SRC SEP INDEX
            arity(name, args, 3)?;
            let i: usize = args[2]
                .parse()
                .map_err(|_| format!("split: index {:?} is not a number", args[2]))?;
            args[0]
                .split(args[1].as_str())
                .nth(i)
                .map(str::to_string)
                .ok_or_else(|| format!("split: index {i} out of range for {:?}", args[0]))
        }
        other => Err(format!("function {other:?} not defined")),
    }
}

/// Renders `s`, replacing every `{{ … }}` action.
pub fn render(s: &str, ctx: &InterpContext) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        let (before, after) = rest.split_at(start);
        let after = &after[2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("template: unclosed action in {s:?}"))?;
        let mut action = &after[..end];
        let mut before = before.to_string();
        if let Some(a) = action.strip_prefix("- ") {
            before = before.trim_end().to_string();
            action = a;
        }
        let mut trim_after = false;
        if let Some(a) = action.strip_suffix(" -") {
            trim_after = true;
            action = a;
        }
        out.push_str(&before);
        let toks = tokenize(action).map_err(|e| format!("template: {e} in {{{{{action}}}}}"))?;
        let mut pos = 0;
        let cmds = parse_pipeline(&toks, &mut pos, false)
            .map_err(|e| format!("template: {e} in {{{{{action}}}}}"))?;
        let v = eval_cmd(&flatten(cmds), None, ctx)
            .map_err(|e| format!("template: {{{{{}}}}}: {e}", action.trim()))?;
        out.push_str(&v);
        rest = &after[end + 2..];
        if trim_after {
            rest = rest.trim_start();
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
];

/// Formats a UTC unix time with a Go reference layout ("2006-01-02 15:04:05").
pub fn go_time_format(t: u64, layout: &str) -> String {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let wd = DAYS[(days.rem_euclid(7)) as usize];
    let month = MONTHS[(mo - 1) as usize];
    // longest tokens first
    let tokens: &[(&str, String)] = &[
        ("January", month.to_string()),
        ("Monday", wd.to_string()),
        ("Z07:00", "Z".into()),
        ("-07:00", "+00:00".into()),
        ("-0700", "+0000".into()),
        ("2006", format!("{y:04}")),
        ("Jan", month[..3].to_string()),
        ("Mon", wd[..3].to_string()),
        ("MST", "UTC".into()),
        ("01", format!("{mo:02}")),
        ("02", format!("{d:02}")),
        ("_2", format!("{d:>2}")),
        ("15", format!("{h:02}")),
        (
            "03",
            format!("{:02}", if h % 12 == 0 { 12 } else { h % 12 }),
        ),
        ("04", format!("{mi:02}")),
        ("05", format!("{s:02}")),
        ("06", format!("{:02}", y.rem_euclid(100))),
        ("PM", (if h >= 12 { "PM" } else { "AM" }).into()),
        ("pm", (if h >= 12 { "pm" } else { "am" }).into()),
        ("1", mo.to_string()),
        ("2", d.to_string()),
        ("3", (if h % 12 == 0 { 12 } else { h % 12 }).to_string()),
        ("4", mi.to_string()),
        ("5", s.to_string()),
    ];
    let mut out = String::new();
    let mut rest = layout;
    'outer: while !rest.is_empty() {
        for (tok, val) in tokens {
            if let Some(r) = rest.strip_prefix(tok) {
                out.push_str(val);
                rest = r;
                continue 'outer;
            }
        }
        let ch = rest.chars().next().unwrap();
        out.push(ch);
        rest = &rest[ch.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> InterpContext {
        let mut c = InterpContext {
            build_name: "mybuild".into(),
            build_type: "nspawn".into(),
            template_path: "/srv/tpl/t.json".into(),
            core_version: "1.6.6".into(),
            init_time: 1_764_949_445, // 2025-12-05T15:44:05Z
            ..Default::default()
        };
        c.user_variables.insert("greeting".into(), "hello".into());
        c.user_variables.insert("csv".into(), "a,b,c".into());
        c
    }

    #[test]
    fn captured_interpolation_case() {
        // from capture 14: "{{user `greeting`}}-{{build_name}}"
        assert_eq!(
            render("{{user `greeting`}}-{{build_name}}", &ctx()).unwrap(),
            "hello-mybuild"
        );
        assert_eq!(render("{{ user \"greeting\" }}", &ctx()).unwrap(), "hello");
        assert_eq!(render("no actions", &ctx()).unwrap(), "no actions");
    }

    #[test]
    fn functions() {
        let c = ctx();
        assert_eq!(render("{{build_type}}", &c).unwrap(), "nspawn");
        assert_eq!(render("{{timestamp}}", &c).unwrap(), "1764949445");
        assert_eq!(render("{{isotime}}", &c).unwrap(), "2025-12-05T15:44:05Z");
        assert_eq!(
            render("{{isotime `2006-01-02 15:04 Mon Jan`}}", &c).unwrap(),
            "2025-12-05 15:44 Fri Dec"
        );
        assert_eq!(render("{{template_dir}}", &c).unwrap(), "/srv/tpl");
        assert_eq!(render("{{upper `abc`}}", &c).unwrap(), "ABC");
        assert_eq!(render("{{user `greeting` | upper}}", &c).unwrap(), "HELLO");
        assert_eq!(render("{{lower (upper `aB`)}}", &c).unwrap(), "ab");
        assert_eq!(
            render("{{replace `a` `x` 1 `banana`}}", &c).unwrap(),
            "bxnana"
        );
        assert_eq!(
            render("{{replace `a` `x` -1 `banana`}}", &c).unwrap(),
            "bxnxnx"
        );
        assert_eq!(
            render("{{replace_all `a` `x` `banana`}}", &c).unwrap(),
            "bxnxnx"
        );
        assert_eq!(render("{{split (user `csv`) `,` 1}}", &c).unwrap(), "b");
        assert_eq!(render("{{packer_version}}", &c).unwrap(), "1.6.6");
        let u = render("{{uuid}}", &c).unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(!render("{{pwd}}", &c).unwrap().is_empty());
    }

    #[test]
    fn errors() {
        let c = ctx();
        assert!(render("{{env `HOME`}}", &c)
            .unwrap_err()
            .contains("env vars are not allowed"));
        let mut c2 = c.clone();
        c2.enable_env = true;
        std::env::set_var("PACKER_INTERP_TEST_VAR", "v");
        assert_eq!(
            render("{{env `PACKER_INTERP_TEST_VAR`}}", &c2).unwrap(),
            "v"
        );
        assert!(render("{{nope}}", &c)
            .unwrap_err()
            .contains("\"nope\" not defined"));
        assert!(render("{{user}}", &c).is_err());
        assert!(render("{{user `x`", &c).is_err());
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(go_time_format(951_782_400, "2006-01-02"), "2000-02-29");
        assert_eq!(go_time_format(0, "Monday 3PM"), "Thursday 12AM");
    }
}
