//! The page frame: head (stylesheet, script), the header with the
//! navigation of the whole product, who is logged in and the logout
//! button, and `main`. Pages render only their content.

use drover_proto::api::Role;
use maud::{html, Markup, DOCTYPE};

use super::assets;
use super::session::UiUser;

/// A section of the dashboard, in navigation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Overview,
    Agents,
    Jobs,
    Workflows,
    Approvals,
    Audit,
    Catalog,
    Policies,
    Deploys,
    Monitoring,
}

/// One navigation entry. `ready` is false until its pages exist; the
/// navigation shows only ready entries the user's role may open, so a
/// page lands by writing it and flipping its flag here.
pub struct NavItem {
    pub section: Section,
    pub label: &'static str,
    pub href: &'static str,
    /// The least role that may open it.
    pub role: Role,
    pub ready: bool,
}

pub const NAV: &[NavItem] = &[
    NavItem {
        section: Section::Overview,
        label: "Overview",
        href: "/ui/",
        role: Role::Viewer,
        ready: true,
    },
    NavItem {
        section: Section::Agents,
        label: "Agents",
        href: "/ui/agents",
        role: Role::Viewer,
        ready: true,
    },
    NavItem {
        section: Section::Jobs,
        label: "Jobs",
        href: "/ui/jobs",
        role: Role::Viewer,
        ready: true,
    },
    NavItem {
        section: Section::Workflows,
        label: "Workflows",
        href: "/ui/workflows",
        role: Role::Viewer,
        ready: true,
    },
    NavItem {
        section: Section::Approvals,
        label: "Approvals",
        href: "/ui/approvals",
        role: Role::Viewer,
        ready: true,
    },
    NavItem {
        section: Section::Audit,
        label: "Audit",
        href: "/ui/audit",
        role: Role::Admin,
        ready: true,
    },
    NavItem {
        section: Section::Catalog,
        label: "Catalog",
        href: "/ui/catalog",
        role: Role::Viewer,
        ready: true,
    },
    NavItem {
        section: Section::Policies,
        label: "Policies",
        href: "/ui/policies",
        role: Role::Viewer,
        ready: false,
    },
    NavItem {
        section: Section::Deploys,
        label: "Deploys",
        href: "/ui/deploys",
        role: Role::Viewer,
        ready: false,
    },
    NavItem {
        section: Section::Monitoring,
        label: "Monitoring",
        href: "/ui/monitoring",
        role: Role::Viewer,
        ready: false,
    },
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Drover" }
            link rel="stylesheet" href=(assets::url("app.css", assets::css()));
            script src=(assets::url("app.js", assets::js())) defer {}
        }
    }
}

/// A page of a logged-in user, in `section`.
pub fn page(user: &UiUser, section: Section, title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui/" { "Drover" }
                    nav aria-label="Main" {
                        ul {
                            @for item in NAV.iter().filter(|i| i.ready && user.auth.role.at_least(i.role)) {
                                li {
                                    @if item.section == section {
                                        a href=(item.href) aria-current="page" { (item.label) }
                                    } @else {
                                        a href=(item.href) { (item.label) }
                                    }
                                }
                            }
                        }
                    }
                    div.who {
                        span.user { (user.auth.username) }
                        " "
                        span.role { "(" (user.auth.role.as_str()) ")" }
                        form method="post" action="/ui/logout" {
                            (super::csrf::field(user))
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main #main tabindex="-1" {
                    h1 { (title) }
                    (content)
                }
            }
        }
    }
}

/// A page without a user: the login page, error pages.
pub fn bare(title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.top { a.brand href="/ui/" { "Drover" } }
                main #main tabindex="-1" { (content) }
            }
        }
    }
}
