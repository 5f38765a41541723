//! Small pieces pages share: a state shown as icon, text and colour
//! class, and pagination.

use std::fmt::Write as _;

use maud::{html, Markup};
use serde::Deserialize;

/// A state as an icon (hidden from screen readers), its name as text, and
/// a class for its colour: never colour alone.
pub fn state_badge(state: &str) -> Markup {
    let (icon, tone) = badge_look(state);
    html! {
        span class={ "badge badge-" (tone) } data-state=(state) {
            span.icon aria-hidden="true" { (icon) } " " (state.replace('_', " "))
        }
    }
}

/// The icon and colour class (`badge-TONE`) of a state's badge; the live
/// pages' script gets them from the server too.
pub fn badge_look(state: &str) -> (&'static str, &'static str) {
    match state {
        "online" | "active" | "succeeded" | "ok" | "approved" => ("●", "good"),
        "stale" | "draining" | "queued" | "dispatched" | "awaiting_approval" | "pending" => {
            ("◐", "warn")
        }
        "running" => ("▶", "busy"),
        "offline" | "cancelled" | "lost" | "expired" | "superseded" => ("○", "off"),
        "revoked" | "stopped" | "failed" | "timed_out" | "rejected" => ("✕", "bad"),
        _ => ("•", "off"),
    }
}

/// A job's id, linked to its page once the jobs pages exist (`NAV`).
pub fn job_link(id: &str) -> Markup {
    let ready = super::layout::NAV
        .iter()
        .any(|i| i.section == super::layout::Section::Jobs && i.ready);
    html! {
        @if ready { a href={ "/ui/jobs/" (id) } { code { (id) } } } @else { code { (id) } }
    }
}

/// `?page=&limit=` of a paginated page.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct PageQuery {
    pub page: Option<usize>,
    pub limit: Option<usize>,
}

/// Rows per page unless asked otherwise, and the most a page shows.
pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 200;

/// A page of rows: which ones, out of how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    /// From 1.
    pub page: usize,
    pub limit: usize,
    pub total: usize,
}

impl Paging {
    /// The page asked for, its size capped, clamped to the pages there are.
    pub fn new(q: &PageQuery, total: usize) -> Paging {
        let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
        let pages = total.div_ceil(limit).max(1);
        Paging {
            page: q.page.unwrap_or(1).clamp(1, pages),
            limit,
            total,
        }
    }

    pub fn pages(&self) -> usize {
        self.total.div_ceil(self.limit).max(1)
    }

    /// The index range of this page's rows.
    pub fn range(&self) -> std::ops::Range<usize> {
        let start = (self.page - 1).saturating_mul(self.limit);
        start.min(self.total)..(start + self.limit).min(self.total)
    }
}

/// Previous/next links keeping the other query parameters (`keep`: names
/// and values, already known to be safe to repeat).
pub fn pagination(base: &str, p: Paging, keep: &[(&str, &str)]) -> Markup {
    let href = |page: usize| {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in keep {
            q.append_pair(k, v);
        }
        q.append_pair("page", &page.to_string());
        q.append_pair("limit", &p.limit.to_string());
        let mut s = String::from(base);
        let _ = write!(s, "?{}", q.finish());
        s
    };
    let range = p.range();
    html! {
        nav.pagination aria-label="Pages" {
            @if p.page > 1 {
                a rel="prev" href=(href(p.page - 1)) { "← Previous" }
            }
            span {
                @if p.total == 0 { "Nothing to show" }
                @else { (range.start + 1) "–" (range.end) " of " (p.total) " · page " (p.page) " of " (p.pages()) }
            }
            @if p.page < p.pages() {
                a rel="next" href=(href(p.page + 1)) { "Next →" }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_caps_the_size_and_clamps_the_page() {
        let q = |page, limit| PageQuery { page, limit };
        let p = Paging::new(&q(None, None), 120);
        assert_eq!((p.page, p.limit, p.range()), (1, 50, 0..50));
        let p = Paging::new(&q(Some(3), None), 120);
        assert_eq!(p.range(), 100..120);
        let p = Paging::new(&q(Some(99), Some(100_000)), 1000);
        assert_eq!((p.page, p.limit, p.range()), (5, MAX_LIMIT, 800..1000));
        let p = Paging::new(&q(Some(0), Some(0)), 0);
        assert_eq!((p.page, p.limit, p.range()), (1, 1, 0..0));
    }

    #[test]
    fn a_state_is_text_and_icon_not_colour_alone() {
        let b = state_badge("stale").into_string();
        assert!(b.contains("stale"), "{b}");
        assert!(b.contains("badge-warn"), "{b}");
        assert!(b.contains("aria-hidden"), "{b}");
    }
}
