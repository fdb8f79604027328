//! Image tiles: each stored image is drawn on request as a small SVG (a coloured tile with its
//! title, its owner and the region its data lives in), so the demo needs no image files and the
//! page needs no external assets.

use super::images::Image;
use super::web::escape;

/// Tile width in pixels.
pub const WIDTH: u32 = 320;
/// Tile height in pixels.
pub const HEIGHT: u32 = 240;

/// The SVG document for an image. The colour is a stable function of owner and id.
pub fn tile(image: &Image) -> String {
    let hue = hue(&image.owner, &image.id);
    let title = escape(&truncate(&image.title, 28));
    let owner = escape(&image.owner);
    let region = escape(&image.region);
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{title}">
<defs><linearGradient id="g" x1="0" y1="0" x2="1" y2="1"><stop offset="0" stop-color="hsl({hue},65%,58%)"/><stop offset="1" stop-color="hsl({hue2},60%,38%)"/></linearGradient></defs>
<rect width="{WIDTH}" height="{HEIGHT}" rx="14" fill="url(#g)"/>
<circle cx="250" cy="80" r="46" fill="#ffffff" fill-opacity="0.18"/>
<path d="M0 190 L90 120 L150 165 L215 105 L320 185 L320 240 L0 240 Z" fill="#000000" fill-opacity="0.18"/>
<rect x="14" y="14" width="{badge}" height="26" rx="13" fill="#000000" fill-opacity="0.35"/>
<text x="{badge_x}" y="32" font-family="sans-serif" font-size="14" font-weight="bold" fill="#ffffff" text-anchor="middle">{region}</text>
<text x="16" y="204" font-family="sans-serif" font-size="20" font-weight="bold" fill="#ffffff">{title}</text>
<text x="16" y="226" font-family="sans-serif" font-size="14" fill="#ffffff" fill-opacity="0.9">@{owner} · stored in {region}</text>
</svg>
"##,
        hue2 = (hue + 40) % 360,
        badge = 20 + 9 * image.region.chars().count(),
        badge_x = 14 + (20 + 9 * image.region.chars().count()) / 2,
    )
}

fn hue(owner: &str, id: &str) -> u32 {
    let mut h: u32 = 2166136261;
    for b in owner.bytes().chain([b'/']).chain(id.bytes()) {
        h = (h ^ u32::from(b)).wrapping_mul(16777619);
    }
    h % 360
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_escape_their_text() {
        let image = Image {
            id: "1".into(),
            owner: "priya".into(),
            title: "<script>alert(1)</script> & more".into(),
            region: "IN".into(),
            url: "/images/priya/1.svg".into(),
        };
        let svg = tile(&image);
        assert!(svg.starts_with("<svg"));
        assert!(!svg.contains("<script>"));
        assert!(svg.contains("&lt;script&gt;"));
        assert!(svg.contains("stored in IN"));
        assert_eq!(svg, tile(&image), "stable");
    }
}
