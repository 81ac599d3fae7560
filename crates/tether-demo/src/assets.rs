//! The web pages, script and style sheet, embedded in the binary.

/// `/`: create or open a document.
pub const INDEX: &str = include_str!("../assets/index.html");
/// `/docs/{id}`: the editor; `{{server}}` and `{{doc}}` are filled in per request.
pub const DOC: &str = include_str!("../assets/doc.html");

/// `/assets/{name}`: the body and its content type.
pub fn get(name: &str) -> Option<(&'static str, &'static str)> {
    match name {
        "app.js" => Some((
            include_str!("../assets/app.js"),
            "text/javascript; charset=utf-8",
        )),
        "ot.js" => Some((
            include_str!("../assets/ot.js"),
            "text/javascript; charset=utf-8",
        )),
        "style.css" => Some((
            include_str!("../assets/style.css"),
            "text/css; charset=utf-8",
        )),
        _ => None,
    }
}
