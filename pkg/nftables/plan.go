package nftables

import (
	"reflect"

	gnft "github.com/google/nftables"
	"sort"

	"github.com/miniproxy/miniproxy/pkg/model"
	rs "github.com/miniproxy/miniproxy/pkg/nftables/ruleset"
)

// plan is the set of changes for one table, executed in a fixed order inside
// one batch so every reference exists when it is created and is gone before
// its target is deleted.
type plan struct {
	family    model.Family
	tableName string
	// replace creates the table from scratch (deleting any leftover one in
	// the same batch).
	replace bool
	// dropTables are other tables of ours to delete first (leftovers).
	dropTables []*gnft.Table

	addSets     []*rs.Set
	addChains   []*rs.Chain
	flushChains []string    // existing chains whose rules are rewritten
	writeChains []*rs.Chain // chains whose rules are (re)added
	sets        map[string]*rs.Set
	delElems    map[string][]rs.Element
	addElems    map[string][]rs.Element
	delChains   []string
	delSets     []string

	services int // service ports touched
}

func newPlan(f model.Family, table string, sets []*rs.Set) *plan {
	p := &plan{family: f, tableName: table, sets: map[string]*rs.Set{},
		delElems: map[string][]rs.Element{}, addElems: map[string][]rs.Element{}}
	for _, s := range sets {
		p.sets[s.Name] = s
	}
	return p
}

// replacePlan writes the whole table t.
func replacePlan(t *rs.Table) *plan {
	p := newPlan(t.Family, t.Name, t.Sets)
	p.replace = true
	p.addSets = t.AllSets()
	p.addChains = t.AllChains()
	p.writeChains = p.addChains
	for m, es := range t.Elements() {
		p.addElems[m] = es
	}
	p.services = len(t.Services)
	return p
}

// diffObjects adds to p what turns the objects old into new (either may be
// empty): chains and sets by name, elements by map and key.
func (p *plan) diffObjects(oldChains, newChains []*rs.Chain, oldSets, newSets []*rs.Set,
	oldElems, newElems []rs.MapElement) {
	oc := make(map[string]*rs.Chain, len(oldChains))
	for _, c := range oldChains {
		oc[c.Name] = c
	}
	nc := make(map[string]bool, len(newChains))
	for _, c := range newChains {
		nc[c.Name] = true
		o, ok := oc[c.Name]
		switch {
		case !ok:
			p.addChains = append(p.addChains, c)
			p.writeChains = append(p.writeChains, c)
		case !reflect.DeepEqual(o.Rules, c.Rules):
			p.flushChains = append(p.flushChains, c.Name)
			p.writeChains = append(p.writeChains, c)
		}
	}
	for _, c := range oldChains {
		if !nc[c.Name] {
			p.delChains = append(p.delChains, c.Name)
		}
	}
	oldNames := make(map[string]bool, len(oldSets))
	for _, s := range oldSets {
		oldNames[s.Name] = true
	}
	newNames := make(map[string]bool, len(newSets))
	for _, s := range newSets {
		newNames[s.Name] = true
		if !oldNames[s.Name] {
			p.addSets = append(p.addSets, s)
		}
	}
	for _, s := range oldSets {
		if !newNames[s.Name] {
			p.delSets = append(p.delSets, s.Name)
		}
	}
	type ek struct{ m, k string }
	keyOf := func(me rs.MapElement) ek { return ek{me.Map, me.KeyString(p.sets[me.Map].Key)} }
	oe := make(map[ek]rs.MapElement, len(oldElems))
	for _, e := range oldElems {
		oe[keyOf(e)] = e
	}
	ne := make(map[ek]bool, len(newElems))
	for _, e := range newElems {
		k := keyOf(e)
		ne[k] = true
		o, ok := oe[k]
		if ok && o.Verdict == e.Verdict {
			continue
		}
		if ok {
			p.delElems[e.Map] = append(p.delElems[e.Map], o.Element)
		}
		p.addElems[e.Map] = append(p.addElems[e.Map], e.Element)
	}
	for _, e := range oldElems {
		if !ne[keyOf(e)] {
			p.delElems[e.Map] = append(p.delElems[e.Map], e.Element)
		}
	}
}

// incrementalPlan turns prev (what is committed) into next, looking only at
// static objects and the service ports whose objects are not shared.
func incrementalPlan(prev, next *rs.Table) *plan {
	p := newPlan(next.Family, next.Name, next.Sets)
	p.diffObjects(prev.Chains, next.Chains, prev.Sets, next.Sets, nil, nil)
	// Objects shared with prev are unchanged; the others are rendered in
	// full again if a table was compacted (only these few).
	for name, so := range next.Services {
		if po := prev.Services[name]; po != so {
			p.services++
			po, so = prev.Objects(name), next.Objects(name)
			if po == nil {
				po = &rs.ServiceObjects{}
			}
			p.diffObjects(po.Chains, so.Chains, po.Sets, so.Sets, po.Elements, so.Elements)
		}
	}
	for name := range prev.Services {
		if _, ok := next.Services[name]; !ok {
			p.services++
			po := prev.Objects(name)
			p.diffObjects(po.Chains, nil, po.Sets, nil, po.Elements, nil)
		}
	}
	if add, del := next.HairpinChanges(prev); len(add)+len(del) > 0 {
		p.addElems[rs.SetHairpin] = append(p.addElems[rs.SetHairpin], add...)
		p.delElems[rs.SetHairpin] = append(p.delElems[rs.SetHairpin], del...)
	}
	p.sortForDeterminism()
	return p
}

// objects counts the tables, chains, sets and elements p creates, rewrites
// or deletes.
func (p *plan) objects() int {
	n := len(p.addSets) + len(p.addChains) + len(p.flushChains) + len(p.delChains) + len(p.delSets) + len(p.dropTables)
	if p.replace {
		n++
	}
	for _, m := range []map[string][]rs.Element{p.addElems, p.delElems} {
		for _, es := range m {
			n += len(es)
		}
	}
	return n
}

func (p *plan) sortForDeterminism() {
	sort.Strings(p.delChains)
	sort.Strings(p.delSets)
	sort.Strings(p.flushChains)
}
