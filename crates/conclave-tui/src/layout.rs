//! Where each pane goes for a terminal size. Shared by drawing and by [`crate::app::App`]
//! (which needs the conversation's width and height to scroll by pages).

use ratatui::layout::Rect;

/// Below this many columns or rows the screen only says it is too small.
pub const MIN_WIDTH: u16 = 40;
pub const MIN_HEIGHT: u16 = 10;
/// The conversation list (its right border included), shown from
/// [`SIDEBAR_MIN_TERMINAL_WIDTH`] columns.
pub const SIDEBAR_WIDTH: u16 = 20;
pub const SIDEBAR_MIN_TERMINAL_WIDTH: u16 = 64;
/// The members pane (its left border included), shown from [`MEMBERS_MIN_TERMINAL_WIDTH`]
/// columns, in rooms, unless hidden (F2).
pub const MEMBERS_WIDTH: u16 = 18;
pub const MEMBERS_MIN_TERMINAL_WIDTH: u16 = 90;
/// Most rows of progress bars.
pub const MAX_TRANSFER_ROWS: u16 = 3;
/// Rows that are not the conversation: its title, the status bar, the input line.
const FIXED_ROWS: u16 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Areas {
    pub sidebar: Option<Rect>,
    pub title: Rect,
    pub chat: Rect,
    pub members: Option<Rect>,
    pub transfers: Option<Rect>,
    pub status: Rect,
    pub input: Rect,
}

pub fn too_small(area: Rect) -> bool {
    area.width < MIN_WIDTH || area.height < MIN_HEIGHT
}

/// The panes of the chat screen. `members`: the members pane is wanted here.
pub fn areas(area: Rect, members: bool, transfers: usize) -> Areas {
    let transfer_rows = (transfers.min(MAX_TRANSFER_ROWS as usize) as u16)
        .min(area.height.saturating_sub(FIXED_ROWS + 2));
    let main_height = area.height.saturating_sub(2 + transfer_rows);
    let input = Rect::new(
        area.x,
        area.y + area.height.saturating_sub(1),
        area.width,
        1,
    );
    let status = Rect::new(
        area.x,
        area.y + area.height.saturating_sub(2),
        area.width,
        1,
    );
    let transfers = (transfer_rows > 0)
        .then(|| Rect::new(area.x, area.y + main_height, area.width, transfer_rows));
    let mut x = area.x;
    let mut width = area.width;
    let sidebar = (area.width >= SIDEBAR_MIN_TERMINAL_WIDTH).then(|| {
        let r = Rect::new(x, area.y, SIDEBAR_WIDTH, main_height);
        x += SIDEBAR_WIDTH;
        width -= SIDEBAR_WIDTH;
        r
    });
    let members = (members && area.width >= MEMBERS_MIN_TERMINAL_WIDTH).then(|| {
        width -= MEMBERS_WIDTH;
        Rect::new(x + width, area.y, MEMBERS_WIDTH, main_height)
    });
    let title = Rect::new(x, area.y, width, 1.min(main_height));
    let chat = Rect::new(x, area.y + 1, width, main_height.saturating_sub(1));
    Areas {
        sidebar,
        title,
        chat,
        members,
        transfers,
        status,
        input,
    }
}

/// The conversation's rows split between the conversation (first) and the thread pane under
/// it (its title row included): half each, the conversation keeping the odd row.
pub fn thread_split(rows: u16) -> (u16, u16) {
    let pane = rows / 2;
    (rows - pane, pane)
}

/// Columns of the conversation for a terminal of `size`.
pub fn chat_width(size: (u16, u16), members: bool) -> usize {
    areas(Rect::new(0, 0, size.0, size.1), members, 0)
        .chat
        .width as usize
}

/// Rows of the conversation for a terminal of `size`.
pub fn chat_rows(size: (u16, u16)) -> usize {
    size.1.saturating_sub(FIXED_ROWS) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panes_fit_at_every_size() {
        for w in MIN_WIDTH..=200 {
            for h in [MIN_HEIGHT, 24, 60] {
                let area = Rect::new(0, 0, w, h);
                let a = areas(area, true, 5);
                for r in [
                    Some(a.title),
                    Some(a.chat),
                    a.sidebar,
                    a.members,
                    a.transfers,
                    Some(a.status),
                    Some(a.input),
                ]
                .into_iter()
                .flatten()
                {
                    assert!(
                        area.contains(r.as_position()) || r.area() == 0,
                        "{w}x{h}: {r:?}"
                    );
                    assert!(
                        r.right() <= area.right() && r.bottom() <= area.bottom(),
                        "{w}x{h}: {r:?}"
                    );
                }
                assert!(a.chat.width >= 20, "{w}x{h}");
                assert!(a.chat.height >= 3, "{w}x{h}");
            }
        }
        assert!(areas(Rect::new(0, 0, 60, 20), true, 0).sidebar.is_none());
        assert!(areas(Rect::new(0, 0, 89, 20), true, 0).members.is_none());
        assert!(areas(Rect::new(0, 0, 90, 20), true, 0).members.is_some());
        assert!(too_small(Rect::new(0, 0, 39, 30)));
        assert!(!too_small(Rect::new(0, 0, 40, 10)));
    }
}
