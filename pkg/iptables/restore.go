package iptables

import (
	"sort"
	"strings"
)

// restoreText accumulates iptables-restore input for the nat and filter tables.
// Sections are emitted in the order restore needs: chain declarations (which
// create or flush), deletions from shared chains, rules, then chain removals.
type restoreText struct {
	declare map[Table][]string
	deletes map[Table][]string
	rules   map[Table][]string
	remove  map[Table][]string
	lines   int
}

func newRestoreText() *restoreText {
	return &restoreText{
		declare: map[Table][]string{}, deletes: map[Table][]string{},
		rules: map[Table][]string{}, remove: map[Table][]string{},
	}
}

// chain declares (creating or flushing) a chain and appends its rules.
func (t *restoreText) chain(c Chain) {
	t.declare[c.Table] = append(t.declare[c.Table], ":"+c.Name+" - [0:0]")
	t.rules[c.Table] = append(t.rules[c.Table], c.Rules...)
}

// drop flushes and deletes a chain that is no longer wanted.
func (t *restoreText) drop(table Table, name string) {
	t.declare[table] = append(t.declare[table], ":"+name+" - [0:0]")
	t.remove[table] = append(t.remove[table], name)
}

// keep takes names off the chains to delete; they are still flushed.
func (t *restoreText) keep(table Table, names map[string]bool) {
	var rest []string
	for _, n := range t.remove[table] {
		if !names[n] {
			rest = append(rest, n)
		}
	}
	t.remove[table] = rest
}

// declared reports the chains this text declares (and so flushes) in table.
func (t *restoreText) declared(table Table) map[string]bool {
	out := make(map[string]bool, len(t.declare[table]))
	for _, d := range t.declare[table] {
		name, _, _ := strings.Cut(strings.TrimPrefix(d, ":"), " ")
		out[name] = true
	}
	return out
}

func (t *restoreText) empty() bool {
	for _, m := range []map[Table][]string{t.declare, t.deletes, t.rules, t.remove} {
		for _, l := range m {
			if len(l) > 0 {
				return false
			}
		}
	}
	return true
}

// String renders the restore input. Tables without content are left out so
// that a partial sync touching only nat does not lock filter.
func (t *restoreText) String() string {
	var b strings.Builder
	size := 0
	for _, m := range []map[Table][]string{t.declare, t.deletes, t.rules, t.remove} {
		for _, lines := range m {
			for _, l := range lines {
				size += len(l) + 4
			}
		}
	}
	b.Grow(size + 64)
	t.lines = 0
	for _, table := range []Table{NAT, Filter} {
		if len(t.declare[table])+len(t.deletes[table])+len(t.rules[table])+len(t.remove[table]) == 0 {
			continue
		}
		b.WriteString("*" + string(table) + "\n")
		decl := append([]string(nil), t.declare[table]...)
		sort.Strings(decl)
		for _, sec := range [][]string{decl, t.deletes[table], t.rules[table]} {
			for _, l := range sec {
				b.WriteString(l)
				b.WriteByte('\n')
				t.lines++
			}
		}
		for _, name := range t.remove[table] {
			b.WriteString("-X " + name + "\n")
			t.lines++
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

// sharedDelta returns the lines to delete from and add to shared chains when
// a service's shared rules go from old to cur.
func sharedDelta(old, cur []string) (del, add []string) {
	oldSet := make(map[string]bool, len(old))
	for _, l := range old {
		oldSet[l] = true
	}
	newSet := make(map[string]bool, len(cur))
	for _, l := range cur {
		newSet[l] = true
		if !oldSet[l] {
			add = append(add, l)
		}
	}
	for _, l := range old {
		if !newSet[l] {
			// "-A CHAIN spec" becomes "-D CHAIN spec".
			del = append(del, "-D"+strings.TrimPrefix(l, "-A"))
		}
	}
	return del, add
}
