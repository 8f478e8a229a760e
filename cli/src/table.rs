//! Printing rows for people (an aligned table) or for programs (JSON lines).

use serde_json::Value;

/// Longest cell of a table, in characters, unless `--wide`: a long reason or
/// name is cut, so a row stays a line.
const MAX_CELL: usize = 60;

/// How rows are printed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Format {
    /// One JSON object per line, every field whole.
    pub(crate) json: bool,
    /// Tables with cells whole.
    pub(crate) wide: bool,
}

impl Format {
    /// Prints `rows` as JSON lines, or as a table of `columns`.
    pub(crate) fn print(self, columns: &[&str], rows: &[Value]) {
        if self.json {
            for row in rows {
                println!("{row}");
            }
            return;
        }
        let cells: Vec<Vec<String>> =
            rows.iter().map(|row| columns.iter().map(|c| self.cell(row, c)).collect()).collect();
        let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
        for row in &cells {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut text = String::new();
            for (cell, width) in cells.iter().zip(&widths) {
                text.push_str(cell);
                text.extend(std::iter::repeat_n(' ', width - cell.chars().count() + 2));
            }
            println!("{}", text.trim_end());
        };
        line(&columns.iter().map(|c| c.to_uppercase()).collect::<Vec<_>>());
        for row in &cells {
            line(row);
        }
    }

    fn cell(self, row: &Value, column: &str) -> String {
        let text = match &row[column] {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map_or(v.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        // One line per row, whatever the text holds.
        let text = text.replace(['\n', '\r', '\t'], " ");
        match text.char_indices().nth(MAX_CELL) {
            Some((end, _)) if !self.wide => format!("{}…", &text[..end]),
            _ => text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_cells_are_cut_unless_wide() {
        let row = serde_json::json!({"a": "x".repeat(100_000), "b": ["1", "2"]});
        let narrow = Format { json: false, wide: false };
        assert_eq!(narrow.cell(&row, "a").chars().count(), MAX_CELL + 1);
        assert_eq!(narrow.cell(&row, "b"), "1,2");
        let wide = Format { json: false, wide: true };
        assert_eq!(wide.cell(&row, "a").len(), 100_000);
        // Printing a cell wider than any format width does not panic.
        wide.print(&["a", "b"], &[row]);
    }
}
