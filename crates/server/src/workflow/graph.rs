//! The task graph of a workflow run, laid out here and drawn as SVG, so the
//! dashboard needs no JavaScript to show it.
//!
//! The layout is a deterministic Sugiyama-style layering, left to right:
//!
//! 1. every task gets the layer of its longest path from a task that needs
//!    nothing (petgraph's `toposort` orders them; a cycle is an error);
//! 2. an edge spanning several layers gets a dummy node in each layer it
//!    crosses, so edges are routed between the nodes, not through them;
//! 3. a few barycenter sweeps (down, then up) reduce crossings; ties are
//!    broken by task id, and the best ordering seen is kept;
//! 4. each layer is a column of fixed-size slots centered vertically;
//!    edges are cubic Bézier curves through their dummy points.
//!
//! Coordinates are integers, so the same input always gives the same bytes.
//!
//! # Live updates
//!
//! The rendered SVG is the contract with the page's script, which must not
//! build HTML. Each task is a `<g id="task-ID" class="task state-STATE"
//! data-task="ID" data-state="STATE">` holding a `<title>` ("ID: WORDS"),
//! the task's description as `<desc>` when it has one, a `<rect>`, a
//! `<text class="glyph">` (the state's icon), a `<text class="label">` (the
//! id) and a `<text class="state">` (the state in words). The `<svg>`
//! carries `data-glyphs` and `data-words`, JSON objects from each state (as
//! in `TaskState::as_str`) to its glyph and words. On a run event with
//! `kind == "task"`, the script finds `task-` + `event.task`, sets
//! `data-state` and the class, and puts the new glyph, words and title in
//! place as text: exactly what [`update`] returns for that event (a
//! [`NodeUpdate`] serializes to JSON, should the server rather send it).
//! With a link function each `<g>` sits in an `<a href>` (e.g. to the
//! task's log), and the `<svg>` is `role="group"`, since links inside
//! `role="img"` would be hidden from screen readers; without, it is
//! `role="img"`. Both have an `aria-label` naming the workflow.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use drover_proto::workflows::{RunEvent, TaskState, WorkflowDef};
use maud::{html, Markup, PreEscaped};
use petgraph::algo::toposort;
use petgraph::graph::{DiGraph, NodeIndex};

/// Width of a task's box.
pub const NODE_W: i64 = 184;
/// Height of a task's box.
pub const NODE_H: i64 = 44;
/// Height of the slot a dummy node (an edge passing a layer) takes.
const DUMMY_H: i64 = 8;
/// Space between two slots of a layer.
const ROW_GAP: i64 = 14;
/// Space between two layers, where the edges bend.
const LAYER_GAP: i64 = 64;
/// Space around the drawing.
const MARGIN: i64 = 16;
/// Rounds of barycenter sweeps (each one down and one up).
const SWEEPS: usize = 4;
/// Most dummy nodes routed; see `layout`.
const MAX_DUMMIES: usize = 20_000;
/// Longest id drawn in full in a box; longer ones end with "…" (the
/// `<title>` has the whole id).
const LABEL_CHARS: usize = 22;

/// Why a set of tasks cannot be drawn. A checked definition never fails;
/// these guard against a stored definition that was damaged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("task '{0}' appears twice")]
    Duplicate(String),
    #[error("task '{task}' needs '{need}', which is not a task of this graph")]
    UnknownNeed { task: String, need: String },
    #[error("the tasks form a cycle through '{0}'")]
    Cycle(String),
}

/// One task to draw.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskNode {
    pub id: String,
    /// Tasks that end before this one starts: the edges into it.
    pub needs: Vec<String>,
    pub state: TaskState,
    /// Free text from the definition, shown in the tooltip.
    pub description: String,
}

/// A task placed on the drawing.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacedNode {
    pub task: TaskNode,
    /// Column, from 0 at the left.
    pub layer: usize,
    /// Rank within its column, from 0 at the top (dummies included).
    pub order: usize,
    /// Top-left corner of its box.
    pub x: i64,
    pub y: i64,
}

/// A `needs` edge, from the needed task to the one that needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacedEdge {
    pub from: String,
    pub to: String,
    /// The SVG path data.
    pub path: String,
}

/// A laid-out graph; [`render`] draws it.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Every task, in the order given.
    pub nodes: Vec<PlacedNode>,
    pub edges: Vec<PlacedEdge>,
    /// Number of columns.
    pub layers: usize,
    /// Dummy nodes added for edges spanning several layers.
    pub dummies: usize,
    /// Edge crossings left after the sweeps.
    pub crossings: usize,
    pub width: i64,
    pub height: i64,
    index: HashMap<String, usize>,
}

impl Layout {
    /// A task by id.
    pub fn node(&self, id: &str) -> Option<&PlacedNode> {
        self.index.get(id).map(|&i| &self.nodes[i])
    }
}

/// The tasks of a definition (whose `needs` already hold the order a mode
/// implies, e.g. each task of a `sequential` workflow needs the one
/// before), with their states; a task missing from `states` is pending.
pub fn tasks_of(def: &WorkflowDef, states: &BTreeMap<String, TaskState>) -> Vec<TaskNode> {
    def.tasks
        .iter()
        .map(|t| TaskNode {
            id: t.id.clone(),
            needs: t.needs.clone(),
            state: states.get(&t.id).copied().unwrap_or(TaskState::Pending),
            description: t.description.clone(),
        })
        .collect()
}

/// A node of the layered graph: a task, or a point an edge passes.
struct LNode {
    layer: usize,
    /// Sort key for ties: the task id, or "from\u{1}to" for a dummy.
    key: String,
    task: Option<usize>,
    up: Vec<usize>,
    down: Vec<usize>,
}

/// Lays the tasks out. Deterministic: the same tasks give the same layout.
pub fn layout(tasks: Vec<TaskNode>) -> Result<Layout, Error> {
    let mut index: HashMap<String, usize> = HashMap::with_capacity(tasks.len());
    for (i, t) in tasks.iter().enumerate() {
        if index.insert(t.id.clone(), i).is_some() {
            return Err(Error::Duplicate(t.id.clone()));
        }
    }

    // Edges, once each, in the order the tasks and their needs are given.
    let mut graph: DiGraph<usize, ()> = DiGraph::with_capacity(tasks.len(), tasks.len());
    let gnodes: Vec<NodeIndex> = (0..tasks.len()).map(|i| graph.add_node(i)).collect();
    let mut edges: Vec<(usize, usize)> = Vec::new();
    let mut seen = BTreeSet::new();
    for (v, t) in tasks.iter().enumerate() {
        for need in &t.needs {
            let Some(&u) = index.get(need) else {
                return Err(Error::UnknownNeed {
                    task: t.id.clone(),
                    need: need.clone(),
                });
            };
            if u == v {
                return Err(Error::Cycle(t.id.clone()));
            }
            if seen.insert((u, v)) {
                edges.push((u, v));
                graph.add_edge(gnodes[u], gnodes[v], ());
            }
        }
    }

    // 1. Layers: the longest path from a source.
    let topo =
        toposort(&graph, None).map_err(|c| Error::Cycle(tasks[graph[c.node_id()]].id.clone()))?;
    let mut layer = vec![0usize; tasks.len()];
    for n in topo {
        let v = graph[n];
        for m in graph.neighbors(n) {
            let w = graph[m];
            layer[w] = layer[w].max(layer[v] + 1);
        }
    }
    let layers = layer.iter().max().map_or(0, |m| m + 1);

    // 2. The layered graph, with a dummy per layer an edge passes.
    let mut lnodes: Vec<LNode> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| LNode {
            layer: layer[i],
            key: t.id.clone(),
            task: Some(i),
            up: Vec::new(),
            down: Vec::new(),
        })
        .collect();
    // Dummies grow with edges times the layers they span; past a budget
    // (only a contrived, dense definition gets there) long edges are drawn
    // straight to their end and left out of the crossing reduction.
    let spans: usize = edges.iter().map(|&(u, v)| layer[v] - layer[u] - 1).sum();
    let route = spans <= MAX_DUMMIES;
    let mut chains: Vec<Vec<usize>> = Vec::with_capacity(edges.len());
    for &(u, v) in &edges {
        let mut chain = vec![u];
        if !route && layer[v] > layer[u] + 1 {
            chains.push(vec![u, v]);
            continue;
        }
        for l in layer[u] + 1..layer[v] {
            lnodes.push(LNode {
                layer: l,
                key: format!("{}\u{1}{}", tasks[u].id, tasks[v].id),
                task: None,
                up: Vec::new(),
                down: Vec::new(),
            });
            chain.push(lnodes.len() - 1);
        }
        chain.push(v);
        for pair in chain.windows(2) {
            lnodes[pair[0]].down.push(pair[1]);
            lnodes[pair[1]].up.push(pair[0]);
        }
        chains.push(chain);
    }
    let dummies = lnodes.len() - tasks.len();

    // 3. Order within layers: start sorted by key, then barycenter sweeps.
    let mut order: Vec<Vec<usize>> = vec![Vec::new(); layers];
    for (i, n) in lnodes.iter().enumerate() {
        order[n.layer].push(i);
    }
    for o in &mut order {
        o.sort_by(|&a, &b| lnodes[a].key.cmp(&lnodes[b].key));
    }
    let mut pos = vec![0usize; lnodes.len()];
    set_positions(&order, &mut pos);
    let mut best = order.clone();
    let mut best_crossings = crossings(&lnodes, &order, &pos);
    for _ in 0..SWEEPS {
        if best_crossings == 0 {
            break;
        }
        for layer in order.iter_mut().skip(1) {
            sort_layer(&lnodes, layer, &mut pos, true);
        }
        for layer in order.iter_mut().rev().skip(1) {
            sort_layer(&lnodes, layer, &mut pos, false);
        }
        let c = crossings(&lnodes, &order, &pos);
        if c < best_crossings {
            best_crossings = c;
            best.clone_from(&order);
        }
    }
    let order = best;
    set_positions(&order, &mut pos);

    // 4. Coordinates: fixed slots, each column centered.
    let slot = |n: &LNode| if n.task.is_some() { NODE_H } else { DUMMY_H };
    let column_h: Vec<i64> = order
        .iter()
        .map(|o| {
            o.iter().map(|&n| slot(&lnodes[n])).sum::<i64>() + ROW_GAP * (o.len() as i64 - 1).max(0)
        })
        .collect();
    let inner_h = column_h.iter().copied().max().unwrap_or(0);
    let mut top = vec![0i64; lnodes.len()];
    for (l, o) in order.iter().enumerate() {
        let mut y = MARGIN + (inner_h - column_h[l]) / 2;
        for &n in o {
            top[n] = y;
            y += slot(&lnodes[n]) + ROW_GAP;
        }
    }
    let column_x = |l: usize| MARGIN + l as i64 * (NODE_W + LAYER_GAP);

    let placed_edges = chains
        .iter()
        .map(|chain| {
            let (u, v) = (chain[0], chain[chain.len() - 1]);
            let mut from = (column_x(lnodes[u].layer) + NODE_W, top[u] + NODE_H / 2);
            let mut path = format!("M{} {}", from.0, from.1);
            for &d in &chain[1..chain.len() - 1] {
                let (x, y) = (column_x(lnodes[d].layer), top[d] + DUMMY_H / 2);
                curve(&mut path, from, (x, y));
                let _ = write!(path, " L{} {}", x + NODE_W, y);
                from = (x + NODE_W, y);
            }
            curve(
                &mut path,
                from,
                (column_x(lnodes[v].layer), top[v] + NODE_H / 2),
            );
            PlacedEdge {
                from: tasks[u].id.clone(),
                to: tasks[v].id.clone(),
                path,
            }
        })
        .collect();

    let nodes = tasks
        .into_iter()
        .enumerate()
        .map(|(i, task)| PlacedNode {
            task,
            layer: layer[i],
            order: pos[i],
            x: column_x(layer[i]),
            y: top[i],
        })
        .collect();
    Ok(Layout {
        nodes,
        edges: placed_edges,
        layers,
        dummies,
        crossings: best_crossings,
        width: 2 * MARGIN + layers as i64 * NODE_W + (layers as i64 - 1).max(0) * LAYER_GAP,
        height: 2 * MARGIN + inner_h,
        index,
    })
}

/// A cubic Bézier from `a` to `b`, leaving and arriving horizontally.
fn curve(path: &mut String, a: (i64, i64), b: (i64, i64)) {
    let mid = (a.0 + b.0) / 2;
    let _ = write!(path, " C{mid} {}, {mid} {}, {} {}", a.1, b.1, b.0, b.1);
}

fn set_positions(order: &[Vec<usize>], pos: &mut [usize]) {
    for o in order {
        for (i, &n) in o.iter().enumerate() {
            pos[n] = i;
        }
    }
}

/// Sorts one layer by the mean position of its neighbours in the layer
/// above (`from_above`) or below; a node without such neighbours keeps its
/// place; ties go by key.
fn sort_layer(lnodes: &[LNode], layer: &mut [usize], pos: &mut [usize], from_above: bool) {
    let mut keyed: Vec<(f64, usize)> = layer
        .iter()
        .map(|&n| {
            let nbs = if from_above {
                &lnodes[n].up
            } else {
                &lnodes[n].down
            };
            let b = if nbs.is_empty() {
                pos[n] as f64
            } else {
                nbs.iter().map(|&m| pos[m] as f64).sum::<f64>() / nbs.len() as f64
            };
            (b, n)
        })
        .collect();
    keyed.sort_by(|a, b| {
        a.0.total_cmp(&b.0)
            .then_with(|| lnodes[a.1].key.cmp(&lnodes[b.1].key))
    });
    for (i, (_, n)) in keyed.into_iter().enumerate() {
        layer[i] = n;
        pos[n] = i;
    }
}

/// Edge crossings between all adjacent layers, counted as inversions with a
/// Fenwick tree (Barth, Jünger, Mutzel), so dense layers stay fast.
fn crossings(lnodes: &[LNode], order: &[Vec<usize>], pos: &[usize]) -> usize {
    let mut total = 0;
    for pair in order.windows(2) {
        let mut ends: Vec<(usize, usize)> = pair[0]
            .iter()
            .flat_map(|&u| lnodes[u].down.iter().map(move |&v| (pos[u], pos[v])))
            .collect();
        ends.sort_unstable();
        let mut tree = vec![0usize; pair[1].len() + 1];
        for (seen, &(_, p)) in ends.iter().enumerate() {
            // Edges already seen that end below this one cross it.
            let mut at_or_above = 0;
            let mut i = p + 1;
            while i > 0 {
                at_or_above += tree[i];
                i &= i - 1;
            }
            total += seen - at_or_above;
            let mut i = p + 1;
            while i < tree.len() {
                tree[i] += 1;
                i += i & i.wrapping_neg();
            }
        }
    }
    total
}

/// The icon drawn beside a task, so its state is not told by colour alone.
pub fn glyph(state: TaskState) -> &'static str {
    match state {
        TaskState::Pending | TaskState::Queued => "◷",
        TaskState::Dispatched => "⇢",
        TaskState::Running => "⟳",
        TaskState::Succeeded => "✓",
        TaskState::Failed => "✗",
        TaskState::TimedOut => "⌛",
        TaskState::Cancelled | TaskState::Skipped => "⊘",
    }
}

/// The state in words, as drawn under the task id.
pub fn words(state: TaskState) -> &'static str {
    match state {
        TaskState::TimedOut => "timed out",
        s => s.as_str(),
    }
}

/// The `class` of a task's `<g>`.
pub fn class(state: TaskState) -> String {
    format!("task state-{}", state.as_str())
}

/// The `id` of a task's `<g>`. Task ids are letters, digits, `_` and `-`
/// (see `def::is_name`), so this is a valid element id.
pub fn element_id(task: &str) -> String {
    format!("task-{task}")
}

fn title(task: &TaskNode) -> String {
    format!("{}: {}", task.id, words(task.state))
}

/// Colours by state, for the dashboard's stylesheet (a strict CSP forbids
/// the inline `<style>` that [`RenderOptions::embed_style`] adds for an SVG
/// viewed on its own).
pub const GRAPH_CSS: &str = "\
.task-graph .edge{fill:none;stroke:#9ca3af;stroke-width:1.5}
.task-graph .task rect{fill:#fff;stroke:#6b7280;stroke-width:1.5}
.task-graph .task text{font:13px system-ui,sans-serif;fill:#111827}
.task-graph .task .state{font-size:11px;fill:#4b5563}
.task-graph .task .glyph{font-size:18px}
.task-graph a:focus .task rect,.task-graph a:hover .task rect{stroke-width:3}
.task-graph .state-pending rect,.task-graph .state-queued rect{fill:#f3f4f6;stroke:#9ca3af}
.task-graph .state-dispatched rect{fill:#e0f2fe;stroke:#0284c7}
.task-graph .state-running rect{fill:#dbeafe;stroke:#2563eb}
.task-graph .state-succeeded rect{fill:#dcfce7;stroke:#16a34a}
.task-graph .state-failed rect,.task-graph .state-timed_out rect{fill:#fee2e2;stroke:#dc2626}
.task-graph .state-cancelled rect,.task-graph .state-skipped rect{fill:#f9fafb;stroke:#9ca3af;stroke-dasharray:4 3}
";

/// How to draw a layout.
#[derive(Default)]
pub struct RenderOptions<'a> {
    /// The workflow's name, in the accessible label.
    pub name: &'a str,
    /// The workflow's description, as the SVG's `<desc>`.
    pub description: &'a str,
    /// Where a task links to (e.g. its log); no links when absent.
    pub link: Option<&'a dyn Fn(&str) -> String>,
    /// Put [`GRAPH_CSS`] in a `<style>` inside the SVG, for a file viewed
    /// on its own; never in a page under the dashboard's CSP.
    pub embed_style: bool,
}

/// Draws a layout as an SVG element, every piece of text escaped.
pub fn render(layout: &Layout, opts: &RenderOptions<'_>) -> Markup {
    let glyphs: BTreeMap<&str, &str> = TaskState::ALL
        .iter()
        .map(|&s| (s.as_str(), glyph(s)))
        .collect();
    let glyphs = serde_json::to_string(&glyphs).unwrap_or_default();
    let words: BTreeMap<&str, &str> = TaskState::ALL
        .iter()
        .map(|&s| (s.as_str(), words(s)))
        .collect();
    let words = serde_json::to_string(&words).unwrap_or_default();
    let count = match layout.nodes.len() {
        1 => "1 task".to_string(),
        n => format!("{n} tasks"),
    };
    let label = if opts.name.is_empty() {
        format!("Task graph: {count}")
    } else {
        format!("Task graph of workflow {}: {count}", opts.name)
    };
    // Links inside role="img" would be hidden from screen readers, so a
    // linked graph is a group of links instead.
    let role = if opts.link.is_some() { "group" } else { "img" };
    let view_box = format!("0 0 {} {}", layout.width, layout.height);
    html! {
        svg xmlns="http://www.w3.org/2000/svg" class="task-graph" role=(role)
            aria-label=(label) viewBox=(view_box) width=(layout.width)
            height=(layout.height) data-glyphs=(glyphs) data-words=(words) {
            @if opts.embed_style {
                style { (PreEscaped(GRAPH_CSS)) }
            }
            @if !opts.description.is_empty() {
                desc { (opts.description) }
            }
            defs {
                marker id="task-graph-arrow" viewBox="0 0 10 10" refX="10" refY="5"
                    markerWidth="6" markerHeight="6" orient="auto-start-reverse" {
                    path d="M0 0 L10 5 L0 10 z" fill="#9ca3af" {}
                }
            }
            g class="edges" aria-hidden="true" {
                @for e in &layout.edges {
                    path class="edge" d=(e.path) data-from=(e.from) data-to=(e.to)
                        fill="none" stroke="#9ca3af" marker-end="url(#task-graph-arrow)" {}
                }
            }
            g class="nodes" {
                @for n in &layout.nodes {
                    @if let Some(link) = opts.link {
                        a href=(link(&n.task.id)) { (node(n)) }
                    } @else {
                        (node(n))
                    }
                }
            }
        }
    }
}

fn node(n: &PlacedNode) -> Markup {
    let t = &n.task;
    let label: String = if t.id.chars().count() > LABEL_CHARS {
        t.id.chars().take(LABEL_CHARS - 1).chain(['…']).collect()
    } else {
        t.id.clone()
    };
    html! {
        g id=(element_id(&t.id)) class=(class(t.state)) data-task=(t.id)
            data-state=(t.state.as_str()) {
            title { (title(t)) }
            @if !t.description.is_empty() {
                desc { (t.description) }
            }
            rect x=(n.x) y=(n.y) width=(NODE_W) height=(NODE_H) rx="6"
                fill="#fff" stroke="#6b7280" {}
            text class="glyph" x=(n.x + 10) y=(n.y + 28) aria-hidden="true" { (glyph(t.state)) }
            text class="label" x=(n.x + 34) y=(n.y + 19) { (label) }
            text class="state" x=(n.x + 34) y=(n.y + 35) { (words(t.state)) }
        }
    }
}

/// What changes on the page when a task's state changes: the script sets
/// these on the element with id `element_id`, as text and attributes only.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeUpdate {
    /// `task-ID`, the `<g>` to change.
    pub element_id: String,
    /// Its new `class`.
    pub class: String,
    /// Its new `data-state`.
    pub state: &'static str,
    /// The new text of its `.glyph`.
    pub glyph: &'static str,
    /// The new text of its `.state`.
    pub words: &'static str,
    /// The new text of its `<title>`.
    pub title: String,
}

/// Records a task's new state and says what to change on the page; `None`
/// when the task is not in the graph or already in that state.
pub fn update(layout: &mut Layout, task: &str, state: TaskState) -> Option<NodeUpdate> {
    let &i = layout.index.get(task)?;
    let t = &mut layout.nodes[i].task;
    if t.state == state {
        return None;
    }
    t.state = state;
    Some(NodeUpdate {
        element_id: element_id(&t.id),
        class: class(state),
        state: state.as_str(),
        glyph: glyph(state),
        words: words(state),
        title: title(t),
    })
}

/// [`update`] for an event of the run's stream; `None` for events that are
/// not a task changing state.
pub fn update_from_event(layout: &mut Layout, event: &RunEvent) -> Option<NodeUpdate> {
    if event.kind != "task" {
        return None;
    }
    let state = TaskState::parse(event.state.as_deref()?)?;
    update(layout, event.task.as_deref()?, state)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use drover_proto::workflows::Mode;

    use super::*;
    use crate::workflow::def;

    /// Tasks from `(id, needs)`, all pending.
    fn tasks(spec: &[(&str, &[&str])]) -> Vec<TaskNode> {
        spec.iter()
            .map(|(id, needs)| TaskNode {
                id: (*id).into(),
                needs: needs.iter().map(|n| (*n).into()).collect(),
                state: TaskState::Pending,
                description: String::new(),
            })
            .collect()
    }

    fn layers_of(l: &Layout) -> Vec<(String, usize)> {
        l.nodes
            .iter()
            .map(|n| (n.task.id.clone(), n.layer))
            .collect()
    }

    /// Ids per column, top to bottom.
    fn columns(l: &Layout) -> Vec<Vec<String>> {
        let mut cols = vec![Vec::new(); l.layers];
        let mut nodes: Vec<&PlacedNode> = l.nodes.iter().collect();
        nodes.sort_by_key(|n| (n.layer, n.y));
        for n in nodes {
            cols[n.layer].push(n.task.id.clone());
        }
        cols
    }

    fn example(name: &str) -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/");
        std::fs::read_to_string(format!("{path}{name}")).unwrap()
    }

    /// A deterministic DAG of `n` tasks: each needs up to three earlier
    /// ones, picked by a small linear congruential generator.
    fn random_dag(n: usize) -> Vec<TaskNode> {
        let mut seed: u64 = 0x5eed;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        (0..n)
            .map(|i| {
                let mut needs = Vec::new();
                if i > 0 {
                    for _ in 0..next() % 4 {
                        let need = format!("t{:03}", next() % i);
                        if !needs.contains(&need) {
                            needs.push(need);
                        }
                    }
                }
                TaskNode {
                    id: format!("t{i:03}"),
                    needs,
                    state: TaskState::ALL[i % TaskState::ALL.len()],
                    description: String::new(),
                }
            })
            .collect()
    }

    #[test]
    fn layers_dummies_and_crossings_of_known_graphs() {
        struct Case {
            name: &'static str,
            tasks: Vec<TaskNode>,
            layers: &'static [(&'static str, usize)],
            dummies: usize,
            crossings: usize,
        }
        let cases = [
            Case {
                name: "one task",
                tasks: tasks(&[("a", &[])]),
                layers: &[("a", 0)],
                dummies: 0,
                crossings: 0,
            },
            Case {
                name: "diamond",
                tasks: tasks(&[("a", &[]), ("b", &["a"]), ("c", &["a"]), ("d", &["b", "c"])]),
                layers: &[("a", 0), ("b", 1), ("c", 1), ("d", 2)],
                dummies: 0,
                crossings: 0,
            },
            Case {
                name: "two chains",
                tasks: tasks(&[
                    ("a1", &[]),
                    ("a2", &["a1"]),
                    ("b1", &[]),
                    ("b2", &["b1"]),
                    ("b3", &["b2"]),
                ]),
                layers: &[("a1", 0), ("a2", 1), ("b1", 0), ("b2", 1), ("b3", 2)],
                dummies: 0,
                crossings: 0,
            },
            Case {
                name: "a shortcut past a chain takes a dummy per layer it passes",
                tasks: tasks(&[("a", &[]), ("b", &["a"]), ("c", &["b"]), ("d", &["c", "a"])]),
                layers: &[("a", 0), ("b", 1), ("c", 2), ("d", 3)],
                dummies: 2,
                crossings: 0,
            },
            Case {
                name: "longest path, not shortest",
                tasks: tasks(&[("x", &["a", "c"]), ("a", &[]), ("b", &["a"]), ("c", &["b"])]),
                layers: &[("x", 3), ("a", 0), ("b", 1), ("c", 2)],
                dummies: 2,
                crossings: 0,
            },
            Case {
                name: "crossed by id order, uncrossed by the sweeps",
                tasks: tasks(&[("a", &[]), ("b", &[]), ("y", &["b"]), ("z", &["a"])]),
                layers: &[("a", 0), ("b", 0), ("y", 1), ("z", 1)],
                dummies: 0,
                crossings: 0,
            },
            Case {
                name: "K2,2 cannot be drawn without a crossing",
                tasks: tasks(&[
                    ("a", &[]),
                    ("b", &[]),
                    ("c", &["a", "b"]),
                    ("d", &["a", "b"]),
                ]),
                layers: &[("a", 0), ("b", 0), ("c", 1), ("d", 1)],
                dummies: 0,
                crossings: 1,
            },
        ];
        for case in cases {
            let l = layout(case.tasks).unwrap();
            let want: Vec<(String, usize)> = case
                .layers
                .iter()
                .map(|(id, n)| ((*id).into(), *n))
                .collect();
            assert_eq!(layers_of(&l), want, "{}", case.name);
            assert_eq!(l.dummies, case.dummies, "{}: dummies", case.name);
            assert_eq!(l.crossings, case.crossings, "{}: crossings", case.name);
            assert_eq!(
                l.edges.len(),
                l.nodes.iter().map(|n| n.task.needs.len()).sum::<usize>(),
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn crossings_are_counted_exactly() {
        // Against the pairwise count, on random two-layer graphs.
        let mut seed: u64 = 7;
        let mut next = move |m: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % m
        };
        for _ in 0..200 {
            let (top, bottom) = (1 + next(8), 1 + next(8));
            let mut lnodes: Vec<LNode> = (0..top + bottom)
                .map(|i| LNode {
                    layer: usize::from(i >= top),
                    key: String::new(),
                    task: Some(i),
                    up: Vec::new(),
                    down: Vec::new(),
                })
                .collect();
            let mut edges = BTreeSet::new();
            for _ in 0..next(20) {
                edges.insert((next(top), top + next(bottom)));
            }
            for &(u, v) in &edges {
                lnodes[u].down.push(v);
                lnodes[v].up.push(u);
            }
            // Shuffle each layer's order.
            let mut order = vec![(0..top).collect::<Vec<_>>(), (top..top + bottom).collect()];
            for o in &mut order {
                for i in (1..o.len()).rev() {
                    o.swap(i, next(i + 1));
                }
            }
            let mut pos = vec![0; top + bottom];
            set_positions(&order, &mut pos);
            let e: Vec<(usize, usize)> = edges.iter().map(|&(u, v)| (pos[u], pos[v])).collect();
            let mut want = 0;
            for (i, a) in e.iter().enumerate() {
                for b in &e[i + 1..] {
                    if (a.0 < b.0 && a.1 > b.1) || (a.0 > b.0 && a.1 < b.1) {
                        want += 1;
                    }
                }
            }
            assert_eq!(
                crossings(&lnodes, &order, &pos),
                want,
                "{edges:?} {order:?}"
            );
        }

        // The benchmark's DAG, 10 layers of 10, each task needing the whole
        // layer before: every pair of layers is K10,10, whose every drawing
        // has C(10,2)² crossings.
        let mut t = Vec::new();
        for layer in 0..10 {
            for i in 0..10 {
                t.push(TaskNode {
                    id: format!("l{layer}-t{i}"),
                    needs: if layer == 0 {
                        vec![]
                    } else {
                        (0..10).map(|j| format!("l{}-t{j}", layer - 1)).collect()
                    },
                    state: TaskState::Pending,
                    description: String::new(),
                });
            }
        }
        let l = layout(t).unwrap();
        assert_eq!((l.layers, l.dummies, l.crossings), (10, 0, 9 * 45 * 45));
    }

    #[test]
    fn the_sweeps_untangle_what_id_order_tangles() {
        // By id, layer 1 is [p, q, r] but their parents are in reverse.
        let l = layout(tasks(&[
            ("a", &[]),
            ("b", &[]),
            ("c", &[]),
            ("p", &["c"]),
            ("q", &["b"]),
            ("r", &["a"]),
        ]))
        .unwrap();
        assert_eq!(l.crossings, 0);
        let cols = columns(&l);
        let parent = |child: &str| match child {
            "p" => "c",
            "q" => "b",
            _ => "a",
        };
        let parents: Vec<&str> = cols[1].iter().map(|c| parent(c)).collect();
        assert_eq!(
            parents,
            cols[0].iter().map(String::as_str).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_wide_fan_out_is_one_centered_column() {
        let mut spec: Vec<(String, Vec<String>)> = vec![("root".into(), vec![])];
        for i in 0..50 {
            spec.push((format!("leaf-{i:02}"), vec!["root".into()]));
        }
        spec.push((
            "join".into(),
            (0..50).map(|i| format!("leaf-{i:02}")).collect(),
        ));
        let tasks: Vec<TaskNode> = spec
            .into_iter()
            .map(|(id, needs)| TaskNode {
                id,
                needs,
                state: TaskState::Pending,
                description: String::new(),
            })
            .collect();
        let l = layout(tasks).unwrap();
        assert_eq!(l.layers, 3);
        assert_eq!(l.crossings, 0);
        let cols = columns(&l);
        assert_eq!(cols[1].len(), 50);
        assert_eq!(cols[1][0], "leaf-00");
        // The root and the join sit in the middle of the column of leaves.
        let root = l.node("root").unwrap();
        let join = l.node("join").unwrap();
        assert_eq!(root.y, join.y);
        assert_eq!(root.y + NODE_H / 2, l.height / 2);
        assert_eq!(l.height, 2 * MARGIN + 50 * NODE_H + 49 * ROW_GAP);
    }

    #[test]
    fn definitions_give_their_edges_whatever_the_mode() {
        let diamond = def::parse(&example("diamond.yaml"), "diamond.yaml")
            .unwrap()
            .def;
        let l = layout(tasks_of(&diamond, &BTreeMap::new())).unwrap();
        assert_eq!(
            columns(&l),
            [
                vec!["build"],
                vec!["test-integration", "test-unit"],
                vec!["publish"]
            ]
        );
        assert_eq!(l.crossings, 0);
        assert!(l.nodes.iter().all(|n| n.task.state == TaskState::Pending));

        // In a sequential workflow each task follows the one before.
        let ws = def::parse(&example("workspace.yaml"), "workspace.yaml")
            .unwrap()
            .def;
        assert_eq!(ws.mode, Mode::Sequential);
        let l = layout(tasks_of(&ws, &BTreeMap::new())).unwrap();
        assert_eq!(
            columns(&l),
            [vec!["readme"], vec!["summary"], vec!["check"]]
        );

        // In a parallel one nothing waits.
        let par = def::parse(
            "name: p\nmode: parallel\ndefaults: {target: all}\ntasks:\n  - {id: a, action: x}\n  - {id: b, action: x}\n",
            "p.yaml",
        )
        .unwrap()
        .def;
        let l = layout(tasks_of(&par, &BTreeMap::new())).unwrap();
        assert_eq!(columns(&l), [vec!["a", "b"]]);
        assert!(l.edges.is_empty());
    }

    #[test]
    fn broken_graphs_are_refused() {
        type Spec<'a> = &'a [(&'a str, &'a [&'a str])];
        let cases: [(Spec<'_>, Error); 4] = [
            (&[("a", &[]), ("a", &[])], Error::Duplicate("a".into())),
            (
                &[("a", &["nope"])],
                Error::UnknownNeed {
                    task: "a".into(),
                    need: "nope".into(),
                },
            ),
            (&[("a", &["a"])], Error::Cycle("a".into())),
            (&[("a", &["b"]), ("b", &["a"])], Error::Cycle("a".into())),
        ];
        for (spec, want) in cases {
            let got = layout(tasks(spec)).unwrap_err();
            match (&got, &want) {
                (Error::Cycle(_), Error::Cycle(_)) => {}
                _ => assert_eq!(got, want),
            }
        }
    }

    #[test]
    fn edges_run_from_the_needed_task_to_the_one_that_needs_it() {
        let l = layout(tasks(&[("a", &[]), ("b", &["a"]), ("c", &["b", "a"])])).unwrap();
        for e in &l.edges {
            let (from, to) = (l.node(&e.from).unwrap(), l.node(&e.to).unwrap());
            let start = format!("M{} {} ", from.x + NODE_W, from.y + NODE_H / 2);
            let end = format!(", {} {}", to.x, to.y + NODE_H / 2);
            assert!(e.path.starts_with(&start), "{}", e.path);
            assert!(e.path.ends_with(&end), "{}", e.path);
        }
        // a→c passes layer 1 through a straight segment as wide as a box.
        let long = l
            .edges
            .iter()
            .find(|e| e.from == "a" && e.to == "c")
            .unwrap();
        assert_eq!(long.path.matches(" C").count(), 2);
        assert_eq!(long.path.matches(" L").count(), 1);
    }

    #[test]
    fn two_hundred_tasks_lay_out_without_overlaps() {
        let l = layout(random_dag(200)).unwrap();
        assert_eq!(l.nodes.len(), 200);
        assert!(l.layers > 3);
        for n in &l.nodes {
            for m in &n.task.needs {
                assert!(l.node(m).unwrap().layer < n.layer);
            }
            assert!(n.x >= 0 && n.x + NODE_W <= l.width);
            assert!(n.y >= 0 && n.y + NODE_H <= l.height);
        }
        let cols = columns(&l);
        for col in &cols {
            for pair in col.windows(2) {
                let (a, b) = (l.node(&pair[0]).unwrap(), l.node(&pair[1]).unwrap());
                assert!(a.y + NODE_H < b.y, "{} overlaps {}", a.task.id, b.task.id);
            }
        }
        let svg = render(&l, &RenderOptions::default()).into_string();
        assert_eq!(svg.matches("<g id=\"task-").count(), 200);
    }

    #[test]
    fn a_dense_graph_draws_long_edges_straight() {
        // Each of 120 tasks needs every one before it: 7,140 edges that
        // would need some 280,000 dummies.
        let t: Vec<TaskNode> = (0..120)
            .map(|i| TaskNode {
                id: format!("t{i:03}"),
                needs: (0..i).map(|j| format!("t{j:03}")).collect(),
                state: TaskState::Pending,
                description: String::new(),
            })
            .collect();
        let l = layout(t).unwrap();
        assert_eq!((l.layers, l.dummies, l.crossings), (120, 0, 0));
        assert_eq!(l.edges.len(), 120 * 119 / 2);
        let long = l
            .edges
            .iter()
            .find(|e| e.from == "t000" && e.to == "t119")
            .unwrap();
        assert_eq!(long.path.matches(" C").count(), 1, "{}", long.path);
        // Within the budget the same kind of edge is routed.
        let l = layout(random_dag(200)).unwrap();
        assert!(l.dummies > 0);
    }

    #[test]
    fn the_same_input_draws_the_same_bytes() {
        let link = |id: &str| format!("/ui/runs/r1/tasks/{id}");
        let opts = RenderOptions {
            name: "big",
            link: Some(&link),
            ..Default::default()
        };
        let one = render(&layout(random_dag(120)).unwrap(), &opts).into_string();
        let two = render(&layout(random_dag(120)).unwrap(), &opts).into_string();
        assert_eq!(one, two);
    }

    #[test]
    fn every_label_is_escaped() {
        let evil = "<script>alert(1)</script>";
        let mut t = tasks(&[("a", &[]), ("b", &["a"])]);
        t[0].description = evil.into();
        let l = layout(t).unwrap();
        let link = |id: &str| format!("/ui/x?\"><script>{id}");
        let svg = render(
            &l,
            &RenderOptions {
                name: evil,
                description: evil,
                link: Some(&link),
                embed_style: false,
            },
        )
        .into_string();
        assert!(!svg.contains("<script"), "{svg}");
        // Name (aria-label), description (<desc>), a task's description
        // (<title>) and the link each show as text.
        assert_eq!(svg.matches("&lt;script&gt;").count(), 5, "{svg}");
    }

    #[test]
    fn a_node_says_its_state_in_class_glyph_words_and_title() {
        let mut t = tasks(&[("build", &[])]);
        t[0].state = TaskState::TimedOut;
        t[0].description = "Build it".into();
        let l = layout(t).unwrap();
        let link = |id: &str| format!("/ui/runs/r1/tasks/{id}/log");
        let svg = render(
            &l,
            &RenderOptions {
                name: "w",
                link: Some(&link),
                ..Default::default()
            },
        )
        .into_string();
        for want in [
            r#"<svg xmlns="http://www.w3.org/2000/svg" class="task-graph" role="group" aria-label="Task graph of workflow w: 1 task" viewBox="0 0 216 76""#,
            r#"<a href="/ui/runs/r1/tasks/build/log"><g id="task-build" class="task state-timed_out" data-task="build" data-state="timed_out"><title>build: timed out</title><desc>Build it</desc><rect "#,
            r#"<text class="glyph" x="26" y="44" aria-hidden="true">⌛</text>"#,
            r#"<text class="label" x="50" y="35">build</text><text class="state" x="50" y="51">timed out</text>"#,
            // The maps the script reads, JSON in attributes.
            "&quot;timed_out&quot;:&quot;⌛&quot;",
            "&quot;timed_out&quot;:&quot;timed out&quot;",
        ] {
            assert!(svg.contains(want), "{want}\n{svg}");
        }
        assert!(!svg.contains("<style"));
        // Without links the drawing is one image.
        let svg = render(
            &l,
            &RenderOptions {
                embed_style: true,
                ..Default::default()
            },
        )
        .into_string();
        assert!(svg.contains("role=\"img\""));
        assert!(!svg.contains("<a "));
        assert!(svg.contains("<style>.task-graph"));

        // Every state has its own class, and a glyph and words, so colour
        // is never the only sign.
        let classes: BTreeSet<String> = TaskState::ALL.iter().map(|&s| class(s)).collect();
        assert_eq!(classes.len(), TaskState::ALL.len());
        for s in TaskState::ALL {
            assert!(!glyph(s).is_empty() && !words(s).is_empty());
            assert!(
                GRAPH_CSS.contains(&format!(".state-{} rect", s.as_str())),
                "{s:?}"
            );
        }
    }

    #[test]
    fn a_long_id_is_shortened_in_the_box_but_whole_in_the_title() {
        let id = "a-very-long-task-identifier-that-goes-on";
        let l = layout(tasks(&[(id, &[])])).unwrap();
        let svg = render(&l, &RenderOptions::default()).into_string();
        assert!(svg.contains(">a-very-long-task-iden…</text>"), "{svg}");
        assert!(svg.contains(&format!("<title>{id}: pending</title>")));
    }

    #[test]
    fn updates_say_what_changes_on_the_page() {
        let mut l = layout(tasks(&[("build", &[]), ("test", &["build"])])).unwrap();
        let want = NodeUpdate {
            element_id: "task-build".into(),
            class: "task state-running".into(),
            state: "running",
            glyph: "⟳",
            words: "running",
            title: "build: running".into(),
        };
        assert_eq!(
            update(&mut l, "build", TaskState::Running),
            Some(want.clone())
        );
        assert_eq!(
            update(&mut l, "build", TaskState::Running),
            None,
            "no change"
        );
        assert_eq!(
            update(&mut l, "nope", TaskState::Running),
            None,
            "not in the graph"
        );
        // The next drawing shows the new state.
        let svg = render(&l, &RenderOptions::default()).into_string();
        assert!(svg.contains(r#"<g id="task-build" class="task state-running" data-task="build" data-state="running">"#));

        let event = |kind: &str, task: Option<&str>, state: Option<&str>| RunEvent {
            id: 1,
            run_id: "r1".into(),
            at: chrono::Utc::now(),
            kind: kind.into(),
            task: task.map(Into::into),
            state: state.map(Into::into),
            message: None,
            stream: None,
        };
        let got = update_from_event(&mut l, &event("task", Some("test"), Some("failed"))).unwrap();
        assert_eq!(
            (got.element_id.as_str(), got.class.as_str(), got.glyph),
            ("task-test", "task state-failed", "✗")
        );
        assert_eq!(serde_json::to_value(&got).unwrap()["state"], "failed");
        for ev in [
            event("run", None, Some("succeeded")),
            event("log", Some("test"), None),
            event("task", Some("test"), Some("bogus")),
            event("task", None, Some("running")),
        ] {
            assert_eq!(update_from_event(&mut l, &ev), None, "{ev:?}");
        }
    }

    #[test]
    fn example_renderings_are_written_for_a_look() {
        let dir = std::env::temp_dir().join("drover-graph");
        std::fs::create_dir_all(&dir).unwrap();
        for (file, states) in [
            (
                "diamond.yaml",
                vec![
                    ("build", TaskState::Succeeded),
                    ("test-unit", TaskState::Running),
                    ("test-integration", TaskState::Failed),
                ],
            ),
            ("workspace.yaml", vec![("readme", TaskState::Succeeded)]),
        ] {
            let d = def::parse(&example(file), file).unwrap().def;
            let states = states
                .into_iter()
                .map(|(t, s)| (t.to_string(), s))
                .collect();
            let l = layout(tasks_of(&d, &states)).unwrap();
            let link = |id: &str| format!("#{id}");
            let svg = render(
                &l,
                &RenderOptions {
                    name: &d.name,
                    description: &d.description,
                    link: Some(&link),
                    embed_style: true,
                },
            )
            .into_string();
            let out = dir.join(file.replace(".yaml", ".svg"));
            std::fs::write(&out, &svg).unwrap();
            assert!(svg.contains(r#"class="task state-succeeded""#));
            eprintln!("wrote {}", out.display());
        }
        let l = layout(random_dag(100)).unwrap();
        let svg = render(
            &l,
            &RenderOptions {
                name: "random-100",
                embed_style: true,
                ..Default::default()
            },
        );
        std::fs::write(dir.join("random-100.svg"), svg.into_string()).unwrap();
    }
}
