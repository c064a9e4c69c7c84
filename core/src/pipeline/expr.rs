//! The expression language of `if:`, triggers and `${{ … }}` templates.
//!
//! Deliberately tiny and safe: literals (`'text'`, `"text"`, numbers, `true`, `false`,
//! `null`), variables (`branch`, `matrix.os`, …), `== != && || !`, parentheses and the
//! functions `startsWith(a, b)`, `contains(a, b)` and — in cache keys only — `hash(path)`.
//! It has no loops, no assignment and no way to run anything: evaluation is a tree walk over
//! values supplied by a [`Context`].
//!
//! Precedence, loosest first: `||`, `&&`, `== !=` (not chainable), `!`, then values.
//! Comparisons are strict: values of different types are never equal, so `tag == ''` is false
//! when there is no tag (`tag` is `null`). Truthiness: `false`, `null`, `0` and `''` are false.

use std::fmt;

/// Longest expression accepted, in bytes.
pub const MAX_EXPR_BYTES: usize = 4096;
/// Deepest nesting of parentheses, `!` and calls accepted.
pub const MAX_EXPR_DEPTH: usize = 32;

/// A value produced while evaluating.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// No value (an unset variable, such as `tag` on a branch push).
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number.
    Num(f64),
    /// A string.
    Str(String),
}

impl Value {
    /// Truthiness: `false`, `null`, `0` and `''` are false, everything else is true.
    pub fn truthy(&self) -> bool {
        match self {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Num(n) => *n != 0.0,
            Value::Str(s) => !s.is_empty(),
        }
    }
}

impl fmt::Display for Value {
    /// The text a value becomes inside a template: `null` renders as nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => Ok(()),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Num(n) => write!(f, "{n}"),
            Value::Str(s) => f.write_str(s),
        }
    }
}

/// A built-in function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    /// `startsWith(text, prefix)`.
    StartsWith,
    /// `contains(text, part)`.
    Contains,
    /// `hash(path)`: a digest of files in the workspace; evaluated by the runner, so it is
    /// only allowed where the runner evaluates (cache keys).
    Hash,
}

impl Func {
    const ALL: [(&'static str, Func, usize); 3] = [
        ("startsWith", Func::StartsWith, 2),
        ("contains", Func::Contains, 2),
        ("hash", Func::Hash, 1),
    ];

    /// The name as written.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, f, _)| *f == self)
            .map_or("?", |(n, _, _)| n)
    }
}

/// A binary operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `&&`
    And,
    /// `||`
    Or,
}

/// A parsed expression. Offsets are character positions within the expression text.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A literal value.
    Lit(Value),
    /// A variable path such as `branch` or `matrix.os`, with its offset.
    Var(Vec<String>, usize),
    /// `!e`
    Not(Box<Expr>),
    /// `a op b`
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `f(args…)`, with the offset of the function name.
    Call(Func, Vec<Expr>, usize),
}

/// Supplies variable values (and file hashes) during evaluation.
pub trait Context {
    /// The value of a variable path; `Null` when unset or unknown.
    fn var(&self, path: &[String]) -> Value;
    /// `hash(pattern)`: only runners can compute it; others return `Null`.
    fn hash(&self, _pattern: &str) -> Value {
        Value::Null
    }
}

/// An error in an expression, at a character offset within its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    /// Character offset of the problem within the expression text.
    pub offset: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ExprError {
    fn new(offset: usize, message: impl Into<String>) -> Self {
        Self {
            offset,
            message: message.into(),
        }
    }
}

impl Expr {
    /// Parses an expression.
    pub fn parse(src: &str) -> Result<Expr, ExprError> {
        if src.len() > MAX_EXPR_BYTES {
            return Err(ExprError::new(
                0,
                format!("expression is longer than {MAX_EXPR_BYTES} bytes; split the condition"),
            ));
        }
        let tokens = lex(src)?;
        let mut p = Parser {
            tokens,
            pos: 0,
            depth: 0,
        };
        if p.peek().tok == Tok::End {
            return Err(ExprError::new(
                0,
                "empty expression; write a condition such as `branch == 'main'`",
            ));
        }
        let e = p.or()?;
        let t = p.peek();
        if t.tok != Tok::End {
            return Err(ExprError::new(
                t.at,
                format!(
                    "unexpected {} after a complete expression; join conditions with `&&` or `||`",
                    t.tok
                ),
            ));
        }
        Ok(e)
    }

    /// Evaluates against `ctx`. Never fails: unknown variables are `null`.
    pub fn eval(&self, ctx: &dyn Context) -> Value {
        match self {
            Expr::Lit(v) => v.clone(),
            Expr::Var(path, _) => ctx.var(path),
            Expr::Not(e) => Value::Bool(!e.eval(ctx).truthy()),
            Expr::Binary(op, a, b) => match op {
                BinOp::And => Value::Bool(a.eval(ctx).truthy() && b.eval(ctx).truthy()),
                BinOp::Or => Value::Bool(a.eval(ctx).truthy() || b.eval(ctx).truthy()),
                BinOp::Eq => Value::Bool(a.eval(ctx) == b.eval(ctx)),
                BinOp::Ne => Value::Bool(a.eval(ctx) != b.eval(ctx)),
            },
            Expr::Call(f, args, _) => {
                let text = |i: usize| args[i].eval(ctx).to_string();
                match f {
                    Func::StartsWith => Value::Bool(text(0).starts_with(&text(1))),
                    Func::Contains => Value::Bool(text(0).contains(&text(1))),
                    Func::Hash => ctx.hash(&text(0)),
                }
            }
        }
    }

    /// Calls `f` for every variable path with its offset, in source order.
    pub fn visit_vars(&self, f: &mut dyn FnMut(&[String], usize)) {
        match self {
            Expr::Lit(_) => {}
            Expr::Var(path, at) => f(path, *at),
            Expr::Not(e) => e.visit_vars(f),
            Expr::Binary(_, a, b) => {
                a.visit_vars(f);
                b.visit_vars(f);
            }
            Expr::Call(_, args, _) => args.iter().for_each(|a| a.visit_vars(f)),
        }
    }

    /// Calls `f` for every function call with the offset of its name, in source order.
    pub fn visit_calls(&self, f: &mut dyn FnMut(Func, usize)) {
        match self {
            Expr::Lit(_) | Expr::Var(..) => {}
            Expr::Not(e) => e.visit_calls(f),
            Expr::Binary(_, a, b) => {
                a.visit_calls(f);
                b.visit_calls(f);
            }
            Expr::Call(func, args, at) => {
                f(*func, *at);
                args.iter().for_each(|a| a.visit_calls(f));
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    Dot,
    Comma,
    LParen,
    RParen,
    EqEq,
    NotEq,
    AndAnd,
    OrOr,
    Bang,
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Str(s) => write!(f, "string '{s}'"),
            Tok::Num(n) => write!(f, "number {n}"),
            Tok::Dot => f.write_str("`.`"),
            Tok::Comma => f.write_str("`,`"),
            Tok::LParen => f.write_str("`(`"),
            Tok::RParen => f.write_str("`)`"),
            Tok::EqEq => f.write_str("`==`"),
            Tok::NotEq => f.write_str("`!=`"),
            Tok::AndAnd => f.write_str("`&&`"),
            Tok::OrOr => f.write_str("`||`"),
            Tok::Bang => f.write_str("`!`"),
            Tok::End => f.write_str("end of expression"),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    at: usize,
}

fn lex(src: &str) -> Result<Vec<Token>, ExprError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let at = i;
        let two = |next: char| chars.get(i + 1) == Some(&next);
        let tok = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '.' => Tok::Dot,
            ',' => Tok::Comma,
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '=' if two('=') => Tok::EqEq,
            '!' if two('=') => Tok::NotEq,
            '&' if two('&') => Tok::AndAnd,
            '|' if two('|') => Tok::OrOr,
            '!' => Tok::Bang,
            '=' => {
                return Err(ExprError::new(
                    at,
                    "`=` is not an operator; compare with `==`",
                ));
            }
            '&' => {
                return Err(ExprError::new(
                    at,
                    "`&` is not an operator; use `&&` for \"and\"",
                ));
            }
            '|' => {
                return Err(ExprError::new(
                    at,
                    "`|` is not an operator; use `||` for \"or\"",
                ));
            }
            '\'' | '"' => {
                // A quote inside a string is written twice: 'it''s'.
                let mut s = String::new();
                let mut j = i + 1;
                loop {
                    match chars.get(j) {
                        None => {
                            return Err(ExprError::new(
                                at,
                                format!("unterminated string; close it with {c}"),
                            ));
                        }
                        Some(&q) if q == c && chars.get(j + 1) == Some(&c) => {
                            s.push(c);
                            j += 2;
                        }
                        Some(&q) if q == c => break,
                        Some(&other) => {
                            s.push(other);
                            j += 1;
                        }
                    }
                }
                i = j + 1;
                out.push(Token {
                    tok: Tok::Str(s),
                    at,
                });
                continue;
            }
            c if c.is_ascii_digit()
                || (c == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                let mut j = i + 1;
                while chars
                    .get(j)
                    .is_some_and(|c| c.is_ascii_digit() || *c == '.')
                {
                    j += 1;
                }
                let text: String = chars[i..j].iter().collect();
                let n = text.parse::<f64>().map_err(|_| {
                    ExprError::new(
                        at,
                        format!("`{text}` is not a number; write numbers like 3 or 1.5"),
                    )
                })?;
                i = j;
                out.push(Token {
                    tok: Tok::Num(n),
                    at,
                });
                continue;
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut j = i + 1;
                while chars
                    .get(j)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                {
                    j += 1;
                }
                let word: String = chars[i..j].iter().collect();
                i = j;
                out.push(Token {
                    tok: Tok::Ident(word),
                    at,
                });
                continue;
            }
            other => {
                return Err(ExprError::new(
                    at,
                    format!("unexpected character `{other}`; strings need quotes, as in 'main'"),
                ));
            }
        };
        i += if matches!(tok, Tok::EqEq | Tok::NotEq | Tok::AndAnd | Tok::OrOr) {
            2
        } else {
            1
        };
        out.push(Token { tok, at });
    }
    out.push(Token {
        tok: Tok::End,
        at: chars.len(),
    });
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Token {
        self.tokens[self.pos].clone()
    }

    fn bump(&mut self) -> Token {
        let t = self.peek();
        if t.tok != Tok::End {
            self.pos += 1;
        }
        t
    }

    fn enter(&mut self, at: usize) -> Result<(), ExprError> {
        self.depth += 1;
        if self.depth > MAX_EXPR_DEPTH {
            return Err(ExprError::new(
                at,
                format!("expression nests deeper than {MAX_EXPR_DEPTH} levels; simplify it"),
            ));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Expr, ExprError> {
        let mut e = self.and()?;
        while self.peek().tok == Tok::OrOr {
            self.bump();
            e = Expr::Binary(BinOp::Or, Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, ExprError> {
        let mut e = self.equality()?;
        while self.peek().tok == Tok::AndAnd {
            self.bump();
            e = Expr::Binary(BinOp::And, Box::new(e), Box::new(self.equality()?));
        }
        Ok(e)
    }

    fn equality(&mut self) -> Result<Expr, ExprError> {
        let left = self.unary()?;
        let op = match self.peek().tok {
            Tok::EqEq => BinOp::Eq,
            Tok::NotEq => BinOp::Ne,
            _ => return Ok(left),
        };
        self.bump();
        let right = self.unary()?;
        let t = self.peek();
        if matches!(t.tok, Tok::EqEq | Tok::NotEq) {
            return Err(ExprError::new(
                t.at,
                "comparisons cannot be chained; join them with `&&` or add parentheses",
            ));
        }
        Ok(Expr::Binary(op, Box::new(left), Box::new(right)))
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        let t = self.peek();
        if t.tok == Tok::Bang {
            self.bump();
            self.enter(t.at)?;
            let e = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(e)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, ExprError> {
        let t = self.bump();
        match t.tok {
            Tok::Str(s) => Ok(Expr::Lit(Value::Str(s))),
            Tok::Num(n) => Ok(Expr::Lit(Value::Num(n))),
            Tok::LParen => {
                self.enter(t.at)?;
                let e = self.or()?;
                self.depth -= 1;
                self.expect_close(t.at, "(")?;
                Ok(e)
            }
            Tok::Ident(word) => match word.as_str() {
                "true" => Ok(Expr::Lit(Value::Bool(true))),
                "false" => Ok(Expr::Lit(Value::Bool(false))),
                "null" => Ok(Expr::Lit(Value::Null)),
                _ if self.peek().tok == Tok::LParen => self.call(word, t.at),
                "and" | "or" | "not" => Err(ExprError::new(
                    t.at,
                    format!(
                        "`{word}` is not an operator; use {}",
                        match word.as_str() {
                            "and" => "`&&`",
                            "or" => "`||`",
                            _ => "`!`",
                        }
                    ),
                )),
                _ => {
                    let mut path = vec![word];
                    while self.peek().tok == Tok::Dot {
                        self.bump();
                        match self.bump() {
                            Token {
                                tok: Tok::Ident(part),
                                ..
                            } => path.push(part),
                            other => {
                                return Err(ExprError::new(
                                    other.at,
                                    format!("expected a name after `.`, found {}", other.tok),
                                ));
                            }
                        }
                    }
                    Ok(Expr::Var(path, t.at))
                }
            },
            Tok::End => Err(ExprError::new(
                t.at,
                "the expression ends where a value was expected; complete the condition",
            )),
            other => Err(ExprError::new(
                t.at,
                format!("unexpected {other}; expected a value such as 'main', a variable or `(`"),
            )),
        }
    }

    fn call(&mut self, name: String, at: usize) -> Result<Expr, ExprError> {
        let Some(&(_, func, arity)) = Func::ALL.iter().find(|(n, _, _)| *n == name) else {
            let names = Func::ALL.iter().map(|(n, _, _)| *n);
            let mut hint = crate::suggest::hint(&name, names);
            if hint.is_empty() {
                hint = "; the functions are startsWith, contains and hash".into();
            }
            return Err(ExprError::new(
                at,
                format!("unknown function `{name}`{hint}"),
            ));
        };
        let open = self.bump();
        self.enter(open.at)?;
        let mut args = Vec::new();
        if self.peek().tok != Tok::RParen {
            loop {
                args.push(self.or()?);
                if self.peek().tok != Tok::Comma {
                    break;
                }
                self.bump();
            }
        }
        self.depth -= 1;
        self.expect_close(open.at, "(")?;
        if args.len() != arity {
            return Err(ExprError::new(
                at,
                format!(
                    "`{name}` takes {arity} argument{}, not {}",
                    if arity == 1 { "" } else { "s" },
                    args.len()
                ),
            ));
        }
        Ok(Expr::Call(func, args, at))
    }

    fn expect_close(&mut self, open_at: usize, open: &str) -> Result<(), ExprError> {
        let t = self.bump();
        if t.tok == Tok::RParen {
            return Ok(());
        }
        Err(ExprError::new(
            t.at,
            format!(
                "expected `)` to close the `{open}` at offset {}, found {}",
                open_at + 1,
                t.tok
            ),
        ))
    }
}

/// A string with `${{ expression }}` parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// The literal and expression parts, in order.
    pub parts: Vec<Part>,
}

/// One part of a [`Template`].
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Literal text.
    Lit(String),
    /// An expression with its source text and the character offset of that text.
    Expr {
        /// The parsed expression.
        expr: Expr,
        /// Its source, between `${{` and `}}`.
        source: String,
        /// Character offset of `source` within the template.
        offset: usize,
    },
}

impl Template {
    /// Parses `text`, finding each `${{ … }}`. Offsets in errors are within `text`.
    pub fn parse(text: &str) -> Result<Template, ExprError> {
        let chars: Vec<char> = text.chars().collect();
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut i = 0;
        while i < chars.len() {
            if chars[i..].starts_with(&['$', '{', '{']) {
                let start = i + 3;
                let end = find_close(&chars, start).ok_or_else(|| {
                    ExprError::new(i, "`${{` is not closed; end the expression with `}}`")
                })?;
                let source: String = chars[start..end].iter().collect();
                let expr = Expr::parse(&source).map_err(|e| ExprError {
                    offset: start + e.offset,
                    message: e.message,
                })?;
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Expr {
                    expr,
                    source: source.trim().to_owned(),
                    offset: start,
                });
                i = end + 2;
            } else {
                lit.push(chars[i]);
                i += 1;
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template { parts })
    }

    /// True when the template has no expressions.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    /// Renders every part against `ctx`.
    pub fn render(&self, ctx: &dyn Context) -> String {
        self.render_partially(ctx, &|_| true)
    }

    /// Renders the expression parts for which `now` is true and writes the others back as
    /// `${{ source }}`, to be rendered later by whoever has their values.
    pub fn render_partially(&self, ctx: &dyn Context, now: &dyn Fn(&Expr) -> bool) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Expr { expr, .. } if now(expr) => out.push_str(&expr.eval(ctx).to_string()),
                Part::Expr { source, .. } => {
                    out.push_str("${{ ");
                    out.push_str(source);
                    out.push_str(" }}");
                }
            }
        }
        out
    }
}

/// Finds the `}}` that closes an expression starting at `from`, skipping quoted strings.
fn find_close(chars: &[char], from: usize) -> Option<usize> {
    let mut quote: Option<char> = None;
    let mut i = from;
    while i < chars.len() {
        let c = chars[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '}' && chars.get(i + 1) == Some(&'}') => return Some(i),
            None => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    struct Vars(HashMap<&'static str, Value>);

    impl Context for Vars {
        fn var(&self, path: &[String]) -> Value {
            self.0
                .get(path.join(".").as_str())
                .cloned()
                .unwrap_or(Value::Null)
        }
    }

    fn push_to(branch: &str) -> Vars {
        Vars(HashMap::from([
            ("event", Value::Str("push".into())),
            ("branch", Value::Str(branch.into())),
            ("matrix.os", Value::Str("linux".into())),
        ]))
    }

    fn eval(src: &str, ctx: &Vars) -> Value {
        Expr::parse(src).unwrap().eval(ctx)
    }

    #[test]
    fn conditions_evaluate_as_written() {
        let main = push_to("main");
        assert_eq!(eval("branch == 'main'", &main), Value::Bool(true));
        assert_eq!(
            eval("branch != 'main' || event == 'push'", &main),
            Value::Bool(true)
        );
        assert_eq!(
            eval("!(event == 'tag') && startsWith(branch, 'ma')", &main),
            Value::Bool(true)
        );
        assert_eq!(eval("contains(matrix.os, 'nux')", &main), Value::Bool(true));
        assert_eq!(eval("tag", &main), Value::Null);
        assert_eq!(eval("tag == ''", &main), Value::Bool(false));
        assert_eq!(eval("'it''s' == \"it's\"", &main), Value::Bool(true));
        assert_eq!(eval("1 == 1.0 && -2 != 2", &main), Value::Bool(true));
    }

    #[test]
    fn and_binds_tighter_than_or() {
        let ctx = push_to("dev");
        // true || (false && false)
        assert_eq!(
            eval("event == 'push' || branch == 'main' && false", &ctx),
            Value::Bool(true)
        );
    }

    #[test]
    fn errors_point_at_the_offending_character() {
        let err = Expr::parse("branch = 'main'").unwrap_err();
        assert_eq!(err.offset, 7);
        assert!(err.message.contains("`==`"), "{}", err.message);

        let err = Expr::parse("branch == 'main").unwrap_err();
        assert_eq!(err.offset, 10);
        assert!(err.message.starts_with("unterminated string"));

        let err = Expr::parse("startswith(branch, 'v')").unwrap_err();
        assert_eq!(err.offset, 0);
        assert_eq!(
            err.message,
            "unknown function `startswith`; did you mean `startsWith`?"
        );

        let err = Expr::parse("(branch == 'main'").unwrap_err();
        assert_eq!(err.offset, 17);

        let err = Expr::parse("a == b == c").unwrap_err();
        assert_eq!(err.offset, 7);

        let err = Expr::parse("branch == 'main' and true").unwrap_err();
        assert_eq!(err.offset, 17);
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let src = format!("{}true{}", "(".repeat(1000), ")".repeat(1000));
        let err = Expr::parse(&src).unwrap_err();
        assert!(err.message.contains("nests deeper"));
        let src = format!("{}true", "!".repeat(1000));
        assert!(Expr::parse(&src).is_err());
    }

    #[test]
    fn templates_render_their_expressions() {
        let t = Template::parse("rust-${{ matrix.os }}-${{ branch }}").unwrap();
        assert_eq!(t.render(&push_to("main")), "rust-linux-main");
        let only_matrix = |e: &Expr| {
            let mut ok = true;
            e.visit_vars(&mut |p, _| ok &= p[0] == "matrix");
            ok
        };
        assert_eq!(
            t.render_partially(&push_to("main"), &only_matrix),
            "rust-linux-${{ branch }}"
        );
        assert!(Template::parse("no expressions").unwrap().is_literal());
    }

    #[test]
    fn a_closing_brace_inside_a_string_does_not_end_the_template_expression() {
        let t = Template::parse("${{ contains(branch, '}}') }}!").unwrap();
        assert_eq!(t.parts.len(), 2);
        let err = Template::parse("x ${{ branch").unwrap_err();
        assert_eq!(err.offset, 2);
    }

    #[test]
    fn template_errors_are_offset_within_the_template() {
        let err = Template::parse("key-${{ hsh('a') }}").unwrap_err();
        assert_eq!(err.offset, 8);
        assert_eq!(err.message, "unknown function `hsh`; did you mean `hash`?");
    }

    proptest! {
        #[test]
        fn no_input_makes_the_expression_parser_panic(s in "\\PC{0,200}") {
            let _ = Expr::parse(&s);
            let _ = Template::parse(&s);
        }

        #[test]
        fn operator_soup_never_panics(s in "[()!=&|'a-z ,.0-9]{0,120}") {
            if let Ok(e) = Expr::parse(&s) {
                let _ = e.eval(&push_to("main"));
            }
        }
    }
}
