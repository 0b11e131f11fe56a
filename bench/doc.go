// Package bench is Sigil's latency harness: it drives concurrent workers
// against signing scenarios (the in-process floor, the agent over its Unix
// socket and TCP, p11-kit, the PKCS#11 front, software keys), measures every
// signature, and reports percentiles, throughput, CPU per signature, the goal
// ratios (the agent's against the floor and p11-kit, the journal's cost, the
// front's against p11-kit) and SLO violations, as a Markdown table, JSON and
// an SVG latency CDF.
//
// The package knows nothing of PKCS#11, the agent or the wire protocol: a
// Scenario is a name, a key label and a function that opens a worker. The
// command that sets up tokens, agents and p11-kit servers builds the scenarios
// and hands them to Run.
//
// The machines this runs on are shared and noisy (figures drift 5-25% between
// runs), so Run interleaves scenarios rep by rep and reports the median over
// reps: ratios between scenarios measured side by side in one run hold even
// when the absolute figures move. A goal is judged on the ratio of the
// medians; the report also gives the ratio rep by rep (rep i of one scenario
// against rep i of the other, seconds apart) and in how many reps the goal
// held, so a verdict that one rep more could flip is seen as such.
package bench
