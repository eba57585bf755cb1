//! The exact fix for a loopback bind, from the listener's command line: which server it is,
//! the flag it was started with, and the flag it needs.
//!
//! Two sources, best first: a loopback address written on the command line (`-b 127.0.0.1:8000`,
//! `--host=localhost`), which is replaced in place; else a server known to bind to loopback by
//! default (`flask run`, `uvicorn`, `vite`, ...), with its own flag.

/// What to change, in one sentence fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BindFix {
    /// The server, as a reader knows it (`gunicorn`, `flask run`, `busybox httpd`).
    pub(crate) framework: &'static str,
    pub(crate) advice: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    HttpServer,
    Flask,
    Django,
    Uvicorn,
    Gunicorn,
    Hypercorn,
    Streamlit,
    Jupyter,
    Rails,
    Puma,
    Next,
    Nuxt,
    Vite,
    WebpackDevServer,
    Angular,
    Node,
    BusyboxHttpd,
    Php,
    Hugo,
    Jekyll,
    Dotnet,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::HttpServer => "python -m http.server",
            Kind::Flask => "flask run",
            Kind::Django => "django runserver",
            Kind::Uvicorn => "uvicorn",
            Kind::Gunicorn => "gunicorn",
            Kind::Hypercorn => "hypercorn",
            Kind::Streamlit => "streamlit",
            Kind::Jupyter => "jupyter",
            Kind::Rails => "rails server",
            Kind::Puma => "puma",
            Kind::Next => "next",
            Kind::Nuxt => "nuxt",
            Kind::Vite => "vite",
            Kind::WebpackDevServer => "webpack-dev-server",
            Kind::Angular => "ng serve",
            Kind::Node => "node",
            Kind::BusyboxHttpd => "busybox httpd",
            Kind::Php => "php -S",
            Kind::Hugo => "hugo server",
            Kind::Jekyll => "jekyll serve",
            Kind::Dotnet => "ASP.NET Core",
        }
    }

    /// How this server is told to listen on every address (`any` is `0.0.0.0` or `::`).
    fn flag(self, port: u16, any: &str) -> String {
        let host_port = if any.contains(':') { format!("[{any}]:{port}") } else { format!("{any}:{port}") };
        match self {
            Kind::HttpServer => format!("`python -m http.server --bind {any} {port}`"),
            Kind::Flask => format!("`flask run --host={any}` (or FLASK_RUN_HOST={any})"),
            Kind::Django => format!("`python manage.py runserver {host_port}`"),
            Kind::Uvicorn => format!("`uvicorn --host {any}`"),
            Kind::Gunicorn => format!("`gunicorn --bind {host_port}`"),
            Kind::Hypercorn => format!("`hypercorn --bind {host_port}`"),
            Kind::Streamlit => format!("`streamlit run --server.address {any}`"),
            Kind::Jupyter => format!("`jupyter lab --ip={any}`"),
            Kind::Rails => format!("`rails server -b {any}`"),
            Kind::Puma => format!("`puma -b tcp://{host_port}`"),
            Kind::Next => format!("`next dev -H {any}` (or `next start -H {any}`)"),
            Kind::Nuxt => format!("`nuxt dev --host {any}` (Nuxt 2: `--hostname {any}`)"),
            Kind::Vite => format!("`vite --host {any}` (or `server.host` in vite.config)"),
            Kind::WebpackDevServer => format!("`webpack serve --host {any}`"),
            Kind::Angular => format!("`ng serve --host {any}`"),
            Kind::Node => {
                format!("`server.listen({port}, \"{any}\")` (express: `app.listen({port}, \"{any}\")`)")
            }
            Kind::BusyboxHttpd => format!("`httpd -p {host_port}`"),
            Kind::Php => format!("`php -S {host_port}`"),
            Kind::Hugo => format!("`hugo server --bind {any}`"),
            Kind::Jekyll => format!("`jekyll serve --host {any}`"),
            Kind::Dotnet => format!("`--urls http://{host_port}` (or ASPNETCORE_URLS=http://+:{port})"),
        }
    }
}

/// File name without a script extension: `/app/node_modules/nuxi/bin/nuxi.mjs` -> `nuxi`.
fn base(s: &str) -> &str {
    let name = s.rsplit('/').next().unwrap_or(s);
    for ext in [".js", ".mjs", ".cjs", ".py", ".rb"] {
        if let Some(stem) = name.strip_suffix(ext)
            && !stem.is_empty()
        {
            return stem;
        }
    }
    name
}

/// Recognises the server from its arguments (process titles such as `gunicorn: master [app]`
/// or `puma 6.4 (tcp://127.0.0.1:3000)` included) and its executable.
// Long because it is a table: one arm per server it recognises.
fn detect(argv: &[String], exe: &str) -> Option<Kind> {
    let tokens: Vec<&str> = argv.iter().flat_map(|a| a.split_whitespace()).collect();
    let names: Vec<String> =
        tokens.iter().map(|t| base(t).trim_end_matches(':').to_ascii_lowercase()).collect();
    let has = |n: &str| names.iter().any(|t| t == n);
    let after = |flag: &str, value: &str| tokens.windows(2).any(|w| w[0] == flag && w[1] == value);
    let argv0 = names.first().map(String::as_str).unwrap_or("");
    if after("-m", "http.server") {
        return Some(Kind::HttpServer);
    }
    if has("manage") && has("runserver") {
        return Some(Kind::Django);
    }
    if (has("flask") || after("-m", "flask")) && has("run") {
        return Some(Kind::Flask);
    }
    for (name, kind) in [
        ("uvicorn", Kind::Uvicorn),
        ("gunicorn", Kind::Gunicorn),
        ("hypercorn", Kind::Hypercorn),
        ("streamlit", Kind::Streamlit),
        ("jupyter", Kind::Jupyter),
        ("jupyter-lab", Kind::Jupyter),
        ("jupyter-notebook", Kind::Jupyter),
        ("webpack-dev-server", Kind::WebpackDevServer),
        ("vite", Kind::Vite),
        ("nuxt", Kind::Nuxt),
        ("nuxi", Kind::Nuxt),
        ("next", Kind::Next),
        ("next-server", Kind::Next),
        ("puma", Kind::Puma),
    ] {
        if has(name) || after("-m", name) {
            return Some(kind);
        }
    }
    if has("rails") && (has("server") || has("s")) {
        return Some(Kind::Rails);
    }
    if has("webpack") && has("serve") {
        return Some(Kind::WebpackDevServer);
    }
    if has("ng") && has("serve") {
        return Some(Kind::Angular);
    }
    if has("hugo") && has("server") {
        return Some(Kind::Hugo);
    }
    if has("jekyll") && has("serve") {
        return Some(Kind::Jekyll);
    }
    if argv0.starts_with("php") && tokens.contains(&"-S") {
        return Some(Kind::Php);
    }
    if argv0 == "httpd" && exe == "busybox"
        || argv0 == "busybox" && names.get(1).is_some_and(|n| n == "httpd")
    {
        return Some(Kind::BusyboxHttpd);
    }
    if argv0 == "dotnet" {
        return Some(Kind::Dotnet);
    }
    if matches!(argv0, "node" | "nodejs" | "bun" | "deno") || exe == "node" {
        return Some(Kind::Node);
    }
    None
}

/// `value` with its loopback address replaced by `any`, if it has one: `127.0.0.1:8000`,
/// `localhost`, `--host=127.0.0.1`, `tcp://127.0.0.1:3000`, `[::1]:80`, `http://localhost:5000`.
fn unloop(value: &str, any: &str) -> Option<String> {
    let (key, rest) = match value.split_once('=') {
        Some((k, r)) if k.starts_with('-') => (format!("{k}="), r),
        _ => (String::new(), value),
    };
    let (scheme, addr) = match rest.split_once("://") {
        Some((s, a)) => (format!("{s}://"), a),
        None => (String::new(), rest),
    };
    let v6_any = if any.contains(':') { any.to_owned() } else { "::".to_owned() };
    let replaced = if let Some(tail) = addr.strip_prefix("[::1]") {
        format!("[{v6_any}]{tail}")
    } else if addr == "::1" {
        v6_any
    } else if let Some(tail) =
        addr.strip_prefix("localhost").filter(|t| t.is_empty() || t.starts_with([':', '/']))
    {
        format!("{any}{tail}")
    } else if addr.starts_with("127.") {
        let end = addr.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(addr.len());
        let ip = &addr[..end];
        if ip.parse::<std::net::Ipv4Addr>().is_err() {
            return None;
        }
        format!("{any}{}", &addr[end..])
    } else {
        return None;
    };
    Some(format!("{key}{scheme}{replaced}"))
}

/// The port written after a loopback address in `value` (`127.0.0.1:8125`, `[::1]:80`,
/// `tcp://localhost:3000/x`), if any.
fn port_in(value: &str) -> Option<u16> {
    let rest = value.split_once('=').filter(|(k, _)| k.starts_with('-')).map_or(value, |(_, r)| r);
    let addr = rest.split_once("://").map_or(rest, |(_, a)| a);
    let tail = match addr.strip_prefix("[::1]") {
        Some(t) => t,
        None => addr.trim_start_matches(|c: char| c.is_ascii_alphanumeric() || c == '.'),
    };
    let digits = tail.strip_prefix(':')?;
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// The fix for a listener started as `argv` (executable `exe`) that listens on loopback only;
/// `port` is the container port and `any` the wildcard address for the family (`0.0.0.0`/`::`).
pub(crate) fn bind_fix(argv: &[String], exe: &str, port: u16, any: &str) -> Option<BindFix> {
    let kind = detect(argv, exe);
    let who = kind.map(Kind::name).unwrap_or_else(|| if argv.is_empty() { "" } else { "the command" });
    // An explicit loopback argument: show it and its replacement, with the flag before it. An
    // argument naming another port is some other endpoint (`--statsd-host localhost:8125`):
    // one naming the bound port comes first, then one naming no port at all.
    let candidates = argv.iter().enumerate().skip(1).filter_map(|(i, arg)| {
        let new = unloop(arg, any)?;
        let named = port_in(arg);
        (named.is_none() || named == Some(port)).then_some((named.is_none(), i, arg, new))
    });
    if let Some((_, i, arg, new)) = candidates.min_by_key(|&(portless, i, _, _)| (portless, i)) {
        let flag =
            argv.get(i - 1).filter(|f| f.starts_with('-') && !arg.starts_with('-') && !f.contains('='));
        let (old, new) = match flag {
            Some(f) => (format!("{f} {arg}"), format!("{f} {new}")),
            None => (arg.clone(), new),
        };
        return Some(BindFix {
            framework: kind.map(Kind::name).unwrap_or("command line"),
            advice: format!("{who} is started with `{old}`: use `{new}`"),
        });
    }
    let kind = kind?;
    Some(BindFix {
        framework: kind.name(),
        advice: format!(
            "{} listens on localhost unless told otherwise: use {}",
            kind.name(),
            kind.flag(port, any)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fix(cmd: &str) -> Option<BindFix> {
        fix_exe(cmd, "")
    }
    fn fix_exe(cmd: &str, exe: &str) -> Option<BindFix> {
        let argv: Vec<String> = cmd.split(' ').map(str::to_owned).collect();
        bind_fix(&argv, exe, 8000, "0.0.0.0")
    }

    #[test]
    fn explicit_loopback_arguments_are_replaced_in_place() {
        let f = fix("/usr/local/bin/python /usr/local/bin/gunicorn -b 127.0.0.1:8000 app:app").unwrap();
        assert_eq!(f.framework, "gunicorn");
        assert_eq!(f.advice, "gunicorn is started with `-b 127.0.0.1:8000`: use `-b 0.0.0.0:8000`");
        let f = fix("flask run --host=127.0.0.1 --port 8000").unwrap();
        assert_eq!(f.advice, "flask run is started with `--host=127.0.0.1`: use `--host=0.0.0.0`");
        let f = fix("puma 6.4.0 (tcp://localhost:3000) [app]").unwrap();
        assert_eq!(f.framework, "puma");
        let f = fix_exe("httpd -f -p 127.0.0.1:8000 -h /www", "busybox").unwrap();
        assert_eq!(f.framework, "busybox httpd");
        assert_eq!(f.advice, "busybox httpd is started with `-p 127.0.0.1:8000`: use `-p 0.0.0.0:8000`");
        let f = fix("python3 -m http.server --bind 127.0.0.1 8000").unwrap();
        assert_eq!(
            f.advice,
            "python -m http.server is started with `--bind 127.0.0.1`: use `--bind 0.0.0.0`"
        );
        let f = fix("./server --listen [::1]:8000").unwrap();
        assert_eq!(f.advice, "the command is started with `--listen [::1]:8000`: use `--listen [::]:8000`");
        assert_eq!(f.framework, "command line");
    }

    /// Only the argument that names the bound port is rewritten: another loopback endpoint on
    /// the command line (a statsd or metrics sink) is not the listener.
    #[test]
    fn only_the_argument_with_the_bound_port_is_rewritten() {
        let f = fix("gunicorn --statsd-host localhost:8125 -b 127.0.0.1:8000 app:app").unwrap();
        assert_eq!(f.advice, "gunicorn is started with `-b 127.0.0.1:8000`: use `-b 0.0.0.0:8000`");
        // A port-less address still counts, after one with the right port.
        let f = fix("uvicorn --host 127.0.0.1 --proxy localhost:9000 app:app").unwrap();
        assert_eq!(f.advice, "uvicorn is started with `--host 127.0.0.1`: use `--host 0.0.0.0`");
        let f = fix("./srv --admin=localhost --listen=127.0.0.1:8000").unwrap();
        assert_eq!(
            f.advice,
            "the command is started with `--listen=127.0.0.1:8000`: use `--listen=0.0.0.0:8000`"
        );
        // Only other ports on loopback: the server's own default flag, not a wrong rewrite.
        let f = fix("gunicorn --statsd-host localhost:8125 app:app").unwrap();
        assert!(f.advice.contains("`gunicorn --bind 0.0.0.0:8000`"), "{}", f.advice);
        assert_eq!(fix("/usr/bin/myserver --upstream 127.0.0.1:6379"), None);
        assert_eq!(port_in("tcp://localhost:3000/x"), Some(3000));
        assert_eq!(port_in("[::1]:80"), Some(80));
        assert_eq!(port_in("::1"), None);
        assert_eq!(port_in("--host=127.0.0.1"), None);
    }

    #[test]
    fn defaults_of_known_servers() {
        for (cmd, name, flag) in [
            ("/usr/local/bin/python /usr/local/bin/flask run", "flask run", "--host=0.0.0.0"),
            ("python -m flask run", "flask run", "--host=0.0.0.0"),
            ("python manage.py runserver", "django runserver", "runserver 0.0.0.0:8000"),
            ("/venv/bin/python /venv/bin/uvicorn main:app", "uvicorn", "--host 0.0.0.0"),
            ("gunicorn: master [app:app]", "gunicorn", "--bind 0.0.0.0:8000"),
            ("ruby bin/rails server", "rails server", "-b 0.0.0.0"),
            ("node /app/node_modules/.bin/vite", "vite", "--host 0.0.0.0"),
            ("node /app/node_modules/.bin/next dev", "next", "-H 0.0.0.0"),
            ("node /app/node_modules/nuxi/bin/nuxi.mjs dev", "nuxt", "--host 0.0.0.0"),
            ("node /app/node_modules/.bin/webpack serve", "webpack-dev-server", "--host 0.0.0.0"),
            ("node server.js", "node", "app.listen(8000, \"0.0.0.0\")"),
            ("php -S localhost:8000", "php -S", "0.0.0.0:8000"),
        ] {
            let f = fix(cmd).unwrap_or_else(|| panic!("{cmd}: no fix"));
            assert_eq!(f.framework, name, "{cmd}");
            assert!(f.advice.contains(flag), "{cmd}: {}", f.advice);
        }
    }

    #[test]
    fn unknown_commands_without_an_address_give_nothing() {
        assert_eq!(fix("/usr/bin/myserver --port 8000"), None);
        assert_eq!(bind_fix(&[], "", 80, "0.0.0.0"), None);
        // 127 as a number is not an address.
        assert_eq!(fix("/usr/bin/myserver --workers 127"), None);
    }

    #[test]
    fn ipv6_wildcard() {
        let argv: Vec<String> =
            ["uvicorn", "app:app", "--host", "::1"].iter().map(|s| s.to_string()).collect();
        let f = bind_fix(&argv, "", 8000, "::").unwrap();
        assert_eq!(f.advice, "uvicorn is started with `--host ::1`: use `--host ::`");
        assert_eq!(unloop("localhost:5000", "0.0.0.0").as_deref(), Some("0.0.0.0:5000"));
        assert_eq!(unloop("localhostx", "0.0.0.0"), None);
        assert_eq!(unloop("http://127.0.0.1:5000", "0.0.0.0").as_deref(), Some("http://0.0.0.0:5000"));
    }
}
