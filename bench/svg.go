package bench

import (
	"encoding/xml"
	"fmt"
	"io"
	"math"
	"strings"
	"time"
	"unicode/utf8"
)

// Colours tell scenarios apart and dash patterns keys, so 5 scenarios × 3 keys
// stay readable without 15 colours. The palette is Tableau 10 minus its yellow,
// which vanishes on white.
var (
	svgColours = []string{"#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#9c755f", "#ff9da7", "#bab0ac"}
	svgDashes  = []string{"", "9 4", "2 3", "12 3 3 3"}
)

const (
	svgMinWidth   = 980
	svgPlotLeft   = 80
	svgPlotTop    = 70
	svgPlotWidth  = 600
	svgPlotHeight = 380
	svgLegendX    = svgPlotLeft + svgPlotWidth + 30
	svgLegendRow  = 18
)

type svgCurve struct {
	res    Result
	colour string
	dash   string
	label  string
}

// WriteSVG draws the latency CDF of every result measured at conns
// connections: latency on a log-scale x axis, the fraction of signatures at or
// under it on y, one polyline per scenario and key. A log x keeps a 20 µs
// signer and a 200 ms cloud KMS on one plot, and the tail shows as how far
// right a curve runs before it reaches 1.
func (r *Report) WriteSVG(w io.Writer, conns int) error {
	// Styles are assigned over the whole report, so a scenario keeps its
	// colour and a key its dash on the plot of every connection count.
	colourOf, dashOf := map[string]string{}, map[string]string{}
	for _, res := range r.Results {
		if _, ok := colourOf[res.Scenario]; !ok {
			colourOf[res.Scenario] = svgColours[len(colourOf)%len(svgColours)]
		}
		if _, ok := dashOf[res.Key]; !ok {
			dashOf[res.Key] = svgDashes[len(dashOf)%len(svgDashes)]
		}
	}
	var curves []svgCurve
	var missing []Result
	legendChars := 0
	for _, res := range r.Results {
		if res.Conns != conns {
			continue
		}
		if len(res.CDF) == 0 {
			missing = append(missing, res)
			continue
		}
		c := svgCurve{res: res, colour: colourOf[res.Scenario], dash: dashOf[res.Key]}
		c.label = fmt.Sprintf("%s / %s: %s, %s", res.Scenario, res.Key,
			formatDuration(usDuration(res.P50us)), formatDuration(usDuration(res.P99us)))
		legendChars = max(legendChars, utf8.RuneCountInString(c.label))
		curves = append(curves, c)
	}
	// 7 px a character is the average advance of a 12 px sans-serif: an
	// estimate, with room to spare, since SVG cannot measure text.
	width := max(svgMinWidth, svgLegendX+36+7*legendChars+20)

	// The x range spans whole decades around every plotted latency.
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, c := range curves {
		lo = min(lo, math.Log10(svgUs(c.res.CDF[0])))
		hi = max(hi, math.Log10(svgUs(c.res.CDF[len(c.res.CDF)-1])))
	}
	decLo, decHi := 1, 4 // 10 µs .. 10 ms when there is nothing to plot
	if len(curves) > 0 {
		decLo, decHi = int(math.Floor(lo)), int(math.Ceil(hi))
		if decHi <= decLo {
			decHi = decLo + 1
		}
	}
	sx := func(us float64) float64 {
		return svgPlotLeft + (math.Log10(us)-float64(decLo))/float64(decHi-decLo)*svgPlotWidth
	}
	sy := func(q float64) float64 { return svgPlotTop + (1-q)*svgPlotHeight }

	legendRows := len(curves) + 1
	height := max(svgPlotTop+svgPlotHeight+90+16*len(missing), svgPlotTop+legendRows*svgLegendRow+20)

	var b strings.Builder
	fmt.Fprintf(&b, `<?xml version="1.0" encoding="UTF-8"?>`+"\n")
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">`+"\n",
		width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")

	title := fmt.Sprintf("Signature latency CDF, %d connection", conns)
	if conns != 1 {
		title += "s"
	}
	fmt.Fprintf(&b, `<text x="%d" y="28" font-size="18" font-weight="bold">%s</text>`+"\n", svgPlotLeft, svgEsc(title))
	if sub := r.svgSubtitle(); sub != "" {
		fmt.Fprintf(&b, `<text x="%d" y="48" fill="#555">%s</text>`+"\n", svgPlotLeft, svgEsc(sub))
	}

	// Grid and ticks: minor lines at 2..9 of each decade, major at decades.
	b.WriteString(`<g stroke="#eee" stroke-width="1">` + "\n")
	for d := decLo; d < decHi; d++ {
		for m := 2; m <= 9; m++ {
			x := sx(float64(m) * math.Pow(10, float64(d)))
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d"/>`+"\n", x, svgPlotTop, x, svgPlotTop+svgPlotHeight)
		}
	}
	b.WriteString("</g>\n")
	b.WriteString(`<g stroke="#ccc" stroke-width="1">` + "\n")
	for d := decLo; d <= decHi; d++ {
		x := sx(math.Pow(10, float64(d)))
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d"/>`+"\n", x, svgPlotTop, x, svgPlotTop+svgPlotHeight)
	}
	for i := 0; i <= 5; i++ {
		y := sy(float64(i) / 5)
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f"/>`+"\n", svgPlotLeft, y, svgPlotLeft+svgPlotWidth, y)
	}
	b.WriteString("</g>\n")
	// The percentiles the report and the SLOs speak of, marked where they sit.
	b.WriteString(`<g stroke="#999" stroke-width="1" stroke-dasharray="4 4">` + "\n")
	// p95 and p99 sit 15 px apart near the top, so their labels go under
	// their lines and p50's over.
	marks := []struct {
		q     float64
		name  string
		label float64 // label baseline offset from the line
	}{{0.5, "p50", -3}, {0.95, "p95", 11}, {0.99, "p99", 11}}
	for _, m := range marks {
		y := sy(m.q)
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f"/>`+"\n", svgPlotLeft, y, svgPlotLeft+svgPlotWidth, y)
	}
	b.WriteString("</g>\n")
	for _, m := range marks {
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" fill="#777" font-size="10" text-anchor="end">%s</text>`+"\n",
			svgPlotLeft+svgPlotWidth-4, sy(m.q)+m.label, m.name)
	}

	// Axes, tick labels and titles.
	fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#333"/>`+"\n",
		svgPlotLeft, svgPlotTop, svgPlotWidth, svgPlotHeight)
	for d := decLo; d <= decHi; d++ {
		x := sx(math.Pow(10, float64(d)))
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#333"/>`+"\n", x, svgPlotTop+svgPlotHeight, x, svgPlotTop+svgPlotHeight+5)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", x, svgPlotTop+svgPlotHeight+20, svgEsc(decadeLabel(d)))
	}
	for i := 0; i <= 5; i++ {
		q := float64(i) / 5
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#333"/>`+"\n", svgPlotLeft-5, sy(q), svgPlotLeft, sy(q))
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end">%.1f</text>`+"\n", svgPlotLeft-8, sy(q)+4, q)
	}
	fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">latency per signature (log scale)</text>`+"\n",
		svgPlotLeft+svgPlotWidth/2, svgPlotTop+svgPlotHeight+42)
	fmt.Fprintf(&b, `<text transform="translate(%d,%d) rotate(-90)" text-anchor="middle">fraction of signatures at or under the latency</text>`+"\n",
		svgPlotLeft-48, svgPlotTop+svgPlotHeight/2)

	// Curves, clipped to the plot so a rounding overshoot cannot spill.
	fmt.Fprintf(&b, `<clipPath id="plot"><rect x="%d" y="%d" width="%d" height="%d"/></clipPath>`+"\n",
		svgPlotLeft-1, svgPlotTop-2, svgPlotWidth+2, svgPlotHeight+4)
	b.WriteString(`<g clip-path="url(#plot)" fill="none" stroke-width="1.8" stroke-linejoin="round">` + "\n")
	for _, c := range curves {
		fmt.Fprintf(&b, `<polyline stroke="%s"%s points="`, c.colour, svgDashAttr(c.dash))
		cdf := c.res.CDF
		if len(cdf) == 1 {
			x := sx(svgUs(cdf[0]))
			fmt.Fprintf(&b, "%.1f,%.1f %.1f,%.1f", x, sy(0), x, sy(1))
		}
		for j := 0; len(cdf) > 1 && j < len(cdf); j++ {
			if j > 0 {
				b.WriteByte(' ')
			}
			fmt.Fprintf(&b, "%.1f,%.1f", sx(svgUs(cdf[j])), sy(float64(j)/float64(len(cdf)-1)))
		}
		fmt.Fprintf(&b, `"><title>%s</title></polyline>`+"\n", svgEsc(c.res.Scenario+" / "+c.res.Key))
	}
	b.WriteString("</g>\n")

	// Legend, with the medians so the plot can be read without the table.
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-weight="bold">scenario / key: p50, p99</text>`+"\n", svgLegendX, svgPlotTop+4)
	for i, c := range curves {
		y := svgPlotTop + (i+1)*svgLegendRow + 4
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2.5"%s/>`+"\n",
			svgLegendX, y-4, svgLegendX+28, y-4, c.colour, svgDashAttr(c.dash))
		fmt.Fprintf(&b, `<text x="%d" y="%d">%s</text>`+"\n", svgLegendX+36, y, svgEsc(c.label))
	}
	if len(curves) == 0 {
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle" fill="#555">no data at this connection count</text>`+"\n",
			svgPlotLeft+svgPlotWidth/2, svgPlotTop+svgPlotHeight/2)
	}
	for i, res := range missing {
		why := "every op failed"
		if res.Err != "" {
			why = "not run: " + res.Err
		}
		if len(why) > 110 {
			why = why[:110] + "…"
		}
		fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#a00" font-size="11">%s</text>`+"\n",
			svgPlotLeft, svgPlotTop+svgPlotHeight+66+16*i, svgEsc(fmt.Sprintf("not plotted: %s/%s: %s", res.Scenario, res.Key, why)))
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func (r *Report) svgSubtitle() string {
	var parts []string
	if r.Machine.CPUModel != "" {
		parts = append(parts, fmt.Sprintf("%d × %s", r.Machine.Cores, r.Machine.CPUModel))
	}
	if r.Machine.GoVersion != "" {
		parts = append(parts, r.Machine.GoVersion)
	}
	if r.Reps > 0 && r.Duration > 0 {
		parts = append(parts, fmt.Sprintf("%d reps × %s merged", r.Reps, r.Duration))
	}
	if !r.Started.IsZero() {
		parts = append(parts, r.Started.UTC().Format("2006-01-02 15:04 UTC"))
	}
	return strings.Join(parts, " · ")
}

// svgUs clamps at 1 ns: a log axis has no place for a zero latency.
func svgUs(d time.Duration) float64 { return math.Max(durationUs(d), 0.001) }

func decadeLabel(exp int) string {
	units := []struct {
		exp  int
		name string
	}{{9, "ks"}, {6, "s"}, {3, "ms"}, {0, "µs"}, {-3, "ns"}}
	for _, u := range units {
		if exp >= u.exp {
			return fmt.Sprintf("%d%s", int(math.Pow10(exp-u.exp)), u.name)
		}
	}
	return fmt.Sprintf("1e%dµs", exp)
}

func svgDashAttr(dash string) string {
	if dash == "" {
		return ""
	}
	return ` stroke-dasharray="` + dash + `"`
}

func svgEsc(s string) string {
	var b strings.Builder
	_ = xml.EscapeText(&b, []byte(s)) // a strings.Builder does not fail
	return b.String()
}
