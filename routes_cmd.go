package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"attache/control"
	"attache/control/routes"
)

const routesUsage = `Usage: attache routes SUBCOMMAND [flags]

Subcommands:
  validate -f FILE        check a route document (offline: no control service needed)
  diff -f FILE            show how FILE differs from the current version
  apply -f FILE           make FILE the current version (says so when nothing changes)
  get [-version N]        print the current version's document (or version N)
  history                 list the stored versions
  rollback -version N     make a copy of version N current
  status                  which gateway serves which version

Flags of every subcommand but validate:
  -control URL            the control service (default $ATTACHE_CONTROL or http://127.0.0.1:9500)
  -api-token TOKEN        its bearer token (default $ATTACHE_CONTROL_TOKEN)

Exit status: 0 success, 1 refused (invalid document, conflict, no such version,
control service unreachable), 2 usage error.
`

// runRoutes is `attache routes`: 0 success, 1 refused or failed, 2 usage.
func runRoutes(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, routesUsage)
		return 2
	}
	sub := args[0]
	switch sub {
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, routesUsage)
		return 0
	case "validate", "diff", "apply", "get", "history", "rollback", "status":
	default:
		fmt.Fprintf(stderr, "attache routes: unknown subcommand %q\n\n%s", sub, routesUsage)
		return 2
	}
	fs := flag.NewFlagSet("attache routes "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	controlURL := os.Getenv("ATTACHE_CONTROL")
	if controlURL == "" {
		controlURL = "http://127.0.0.1:9500"
	}
	fs.StringVar(&controlURL, "control", controlURL, "control service `URL`; $ATTACHE_CONTROL sets the default")
	token := fs.String("api-token", os.Getenv("ATTACHE_CONTROL_TOKEN"), "bearer `token` of the control API; $ATTACHE_CONTROL_TOKEN sets the default")
	var file string
	var version uint64
	switch sub {
	case "validate", "diff", "apply":
		fs.StringVar(&file, "f", "", "route document `file` (HCL, or JSON when it ends in .json); - reads stdin")
	case "get", "rollback":
		fs.Uint64Var(&version, "version", 0, "version `number`")
	}
	var expect int64 = -1
	if sub == "apply" || sub == "rollback" {
		fs.Int64Var(&expect, "expect", -1, "refuse unless the current version is this `number` (0: nothing applied yet)")
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	usage := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "attache routes %s: %s\n", sub, fmt.Sprintf(format, a...))
		return 2
	}
	if fs.NArg() > 0 {
		return usage("unexpected argument %q", fs.Arg(0))
	}
	var src []byte
	if file == "" && (sub == "validate" || sub == "diff" || sub == "apply") {
		return usage("-f FILE is required")
	}
	if file != "" {
		var err error
		if file == "-" {
			src, err = io.ReadAll(io.LimitReader(os.Stdin, routes.MaxDocumentBytes+1))
			file = "stdin"
		} else {
			src, err = os.ReadFile(file)
		}
		if err != nil {
			fmt.Fprintf(stderr, "attache routes %s: %v\n", sub, err)
			return 1
		}
	}
	if sub == "rollback" && version == 0 {
		return usage("-version N is required")
	}
	var exp *uint64
	if expect >= 0 {
		e := uint64(expect)
		exp = &e
	}
	if sub == "validate" {
		doc, err := routes.Parse(file, src)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		fmt.Fprintf(stdout, "%s: valid, %d routes\n", file, len(doc.Routes))
		return 0
	}
	// Anything that needs the control service: parse first, so an invalid
	// document is refused the same way offline.
	if src != nil {
		if _, err := routes.Parse(file, src); err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
	}
	c := control.NewClient(controlURL, *token)
	fail := func(err error) int {
		fmt.Fprintf(stderr, "attache routes %s: %v\n", sub, err)
		return 1
	}
	switch sub {
	case "diff":
		res, err := c.Diff(ctx, file, src)
		if err != nil {
			return fail(err)
		}
		printWarnings(stderr, res.Warnings)
		if !res.Changed {
			fmt.Fprintf(stdout, "no change: %s equals the current version %d\n", file, res.Current)
			return 0
		}
		if res.Current == 0 {
			fmt.Fprintln(stdout, "nothing applied yet; applying would add:")
		} else {
			fmt.Fprintf(stdout, "changes against the current version %d:\n", res.Current)
		}
		fmt.Fprint(stdout, res.Diff)
	case "apply", "rollback":
		var res *control.Result
		var err error
		if sub == "apply" {
			res, err = c.Apply(ctx, file, src, exp)
		} else {
			res, err = c.Rollback(ctx, version, exp)
		}
		if err != nil {
			return fail(err)
		}
		printWarnings(stderr, res.Warnings)
		fmt.Fprintln(stdout, res.Message)
		fmt.Fprint(stdout, res.Diff)
		if len(res.Pruned) > 0 {
			fmt.Fprintf(stdout, "pruned old versions %v\n", res.Pruned)
		}
	case "get":
		v, err := c.Get(ctx, version)
		if err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "# version %d, %s, %s\n%s", v.Number, v.Source, v.Created.Format(time.RFC3339), v.Document)
	case "history":
		h, err := c.History(ctx)
		if err != nil {
			return fail(err)
		}
		if len(h.Versions) == 0 {
			fmt.Fprintln(stdout, "no versions yet")
			return 0
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "VERSION\tCREATED\tROUTES\tSOURCE\t\t")
		for _, v := range h.Versions {
			mark := ""
			if v.Current {
				mark = "current"
			}
			if v.Error != "" {
				mark = strings.TrimSpace(mark + " unreadable: " + v.Error)
			}
			fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%s\n", v.Version, v.Created.Format(time.RFC3339), v.Routes, v.Source, mark)
		}
		tw.Flush()
	case "status":
		st, err := c.Status(ctx)
		if err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "current version: %d\n", st.Current)
		if len(st.Gateways) == 0 {
			fmt.Fprintln(stdout, "no gateway has reported a version")
			return 0
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "GATEWAY\tVERSION\tSINCE\tSTATE\t")
		for _, g := range st.Gateways {
			state := "current"
			switch {
			case g.Invalid != "":
				state = "unreadable record: " + g.Invalid
			case g.Error != "":
				state = fmt.Sprintf("refused version %d: %s", g.Refused, g.Error)
			case !g.Current:
				state = "behind"
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t\n", g.Node, g.Version, g.Time.Format(time.RFC3339), state)
		}
		tw.Flush()
		for _, g := range st.Gateways {
			if len(g.Routes) == 0 {
				continue
			}
			fmt.Fprintf(stdout, "\nroutes on %s:\n", g.Node)
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			for _, r := range g.Routes {
				fmt.Fprintf(tw, "  %s\t%s%s\t%s\t\n", r.Name, r.Host, r.Prefix, r.Origin)
			}
			tw.Flush()
		}
	}
	return 0
}

func printWarnings(w io.Writer, ws []string) {
	for _, m := range ws {
		fmt.Fprintln(w, "warning: "+strings.TrimSpace(m))
	}
}
