// Command ollama_template renders Ollama TEMPLATE strings with Go's own text/template, the way Ollama's
// template package does (github.com/ollama/ollama, template/template.go: Parse, Execute, collate,
// convertMessagesForTemplate, funcs). It is a test tool for llamatailor's Modelfile export.
//
// Input on stdin: a JSON array of cases {"template", "today" (YYYY-MM-DD, the server's date), "messages"
// [{"role", "content"}], "tools" (optional, OpenAI-style tool list)}. Output on stdout: a JSON array of
// {"text"} or {"error"}, one per case, in order. Only Ollama's chat path (templates that read .Messages)
// is mirrored; a template without .Messages gets an error rather than a silent guess at the legacy path.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

type apiMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template string          `json:"template"`
	Today    string          `json:"today"`
	Messages []apiMessage    `json:"messages"`
	Tools    json.RawMessage `json:"tools"`
}

type result struct {
	Text  string `json:"text"`
	Error string `json:"error,omitempty"`
}

// templateMessage mirrors Ollama's templateMessage: the fields a template sees on each of .Messages.
type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []any
	ToolName   string
	ToolCallID string
}

// templateTool and its parts mirror Ollama's templateTool (JSON when printed, fields for ranging).
type templateTool struct {
	Type     string               `json:"type"`
	Items    any                  `json:"items,omitempty"`
	Function templateToolFunction `json:"function"`
}

type templateToolFunction struct {
	Name        string                         `json:"name"`
	Description string                         `json:"description"`
	Parameters  templateToolFunctionParameters `json:"parameters"`
}

type templateToolFunctionParameters struct {
	Type       string         `json:"type"`
	Defs       any            `json:"$defs,omitempty"`
	Items      any            `json:"items,omitempty"`
	Required   []string       `json:"required,omitempty"`
	Properties map[string]any `json:"properties"`
}

type templateTools []templateTool

func (t templateTools) String() string {
	bts, _ := json.Marshal(t)
	return string(bts)
}

func (t templateTool) String() string {
	bts, _ := json.Marshal(t)
	return string(bts)
}

// funcs are Ollama's template functions, with "now" fixed to the case's date instead of time.Now(),
// so that a check can run at a date other than today.
func funcs(now time.Time) template.FuncMap {
	return template.FuncMap{
		"json": func(v any) string {
			b, _ := json.Marshal(v)
			return string(b)
		},
		"currentDate": func(args ...string) string {
			return now.Format("2006-01-02")
		},
		"yesterdayDate": func(args ...string) string {
			return now.AddDate(0, 0, -1).Format("2006-01-02")
		},
	}
}

// collate is Ollama's: consecutive messages of one role merge (except tool), system messages are joined.
func collate(msgs []apiMessage) (string, []*apiMessage) {
	var system []string
	var collated []*apiMessage
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

// identifiers is Ollama's Identifiers: the field names a template reads, to choose the chat path.
func identifiers(n parse.Node) []string {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, c := range n.Nodes {
			names = append(names, identifiers(c)...)
		}
		return names
	case *parse.ActionNode:
		return identifiers(n.Pipe)
	case *parse.TemplateNode:
		return identifiers(n.Pipe)
	case *parse.IfNode:
		return branchIdentifiers(&n.BranchNode)
	case *parse.RangeNode:
		return branchIdentifiers(&n.BranchNode)
	case *parse.WithNode:
		return branchIdentifiers(&n.BranchNode)
	case *parse.PipeNode:
		var names []string
		if n == nil {
			return names
		}
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				names = append(names, identifiers(a)...)
			}
		}
		return names
	case *parse.FieldNode:
		return n.Ident
	case *parse.VariableNode:
		return n.Ident
	}
	return nil
}

func branchIdentifiers(n *parse.BranchNode) []string {
	names := identifiers(n.Pipe)
	for _, l := range []*parse.ListNode{n.List, n.ElseList} {
		if l != nil {
			names = append(names, identifiers(l)...)
		}
	}
	return names
}

func readsMessages(t *template.Template) bool {
	for _, name := range identifiers(t.Tree.Root) {
		if strings.ToLower(name) == "messages" {
			return true
		}
	}
	return false
}

func render(c request) (string, error) {
	now, err := time.ParseInLocation("2006-01-02", c.Today, time.Local)
	if err != nil {
		return "", fmt.Errorf("today: %w", err)
	}
	now = now.Add(12 * time.Hour)
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs(now)).Parse(c.Template)
	if err != nil {
		return "", err
	}
	if !readsMessages(tmpl) {
		return "", errors.New("template does not read .Messages: Ollama's legacy prompt path is not mirrored")
	}
	var tools templateTools
	if len(c.Tools) > 0 && string(c.Tools) != "null" {
		if err := json.Unmarshal(c.Tools, &tools); err != nil {
			return "", fmt.Errorf("tools: %w", err)
		}
	}
	system, collated := collate(c.Messages)
	messages := make([]*templateMessage, len(collated))
	for i, m := range collated {
		messages[i] = &templateMessage{Role: m.Role, Content: m.Content}
	}
	var b bytes.Buffer
	err = tmpl.Execute(&b, map[string]any{
		"System":     system,
		"Messages":   messages,
		"Tools":      tools,
		"Response":   "",
		"Think":      false,
		"ThinkLevel": "",
		"IsThinkSet": false,
	})
	return b.String(), err
}

func main() {
	var cases []request
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		fmt.Fprintln(os.Stderr, "reading cases:", err)
		os.Exit(2)
	}
	results := make([]result, len(cases))
	for i, c := range cases {
		text, err := render(c)
		results[i] = result{Text: text}
		if err != nil {
			results[i].Error = err.Error()
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, "writing results:", err)
		os.Exit(2)
	}
}
